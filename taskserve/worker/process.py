"""The body of one worker process: signals, the supervisor watch, maintenance and exit.

A worker must never outlive its supervisor, whatever it is doing when the supervisor dies
(importing the service, loading the model, running tasks): a worker nobody supervises
claims tasks for ever and holds its GPU. ``ParentWatch`` sees to it from the first moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import _runtime
from ..exceptions import QueueUnavailable
from ..queue.base import Queue
from .core import EXIT_RECYCLE, Worker

logger = logging.getLogger("taskserve.worker")

SUPERVISOR_PID = "TASKSERVE_SUPERVISOR_PID"  # set by the supervisor: the pid to watch
WORKER_ID = "TASKSERVE_WORKER_ID"  # set by the supervisor: this worker's id in the store
EXIT_ORPHANED = 70
PR_SET_PDEATHSIG = 1


def flush_logs() -> None:
    """Before ``os._exit``, which skips the interpreter's own flushing."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


class ParentWatch:
    """Ends this process within about two seconds of its supervisor's death.

    Three layers, because each alone has a gap: on Linux the kernel sends SIGHUP when the
    parent dies (``PR_SET_PDEATHSIG``), which ends the process at once until the worker
    installs its handler; the parent is checked right after that is set up, for a death
    before it; and a thread polls the parent's pid, for other systems and for a worker whose
    loop is too busy to run the handler. Until ``attach`` the process just exits (nothing is
    held yet); after it, the worker is stopped with no grace so it hands its tasks back, and
    the process exits regardless if that takes longer than ``patience``.
    """

    def __init__(self, parent: int, *, poll: float = 0.2, patience: float = 1.5) -> None:
        self.parent = parent
        self.poll = poll
        self.patience = patience
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_orphaned: Callable[[], None] | None = None
        self._fired = False

    @classmethod
    def from_env(cls) -> ParentWatch | None:
        """Start watching the supervisor named in the environment, if any (exits now if it is gone)."""
        value = os.environ.get(SUPERVISOR_PID)
        if not value:
            return None
        watch = cls(int(value))
        watch.start()
        return watch

    def orphaned(self) -> bool:
        return os.getppid() != self.parent

    def start(self) -> None:
        # An inherited "ignore" (nohup) would make the death signal a no-op.
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGHUP), 0, 0, 0)
        if self.orphaned():  # died before the kernel could be told to tell us
            os._exit(EXIT_ORPHANED)
        threading.Thread(target=self._poll, name="taskserve-parent-watch", daemon=True).start()

    def attach(self, loop: asyncio.AbstractEventLoop, on_orphaned: Callable[[], None]) -> None:
        """From now on an orphaned worker is stopped through ``on_orphaned`` (on ``loop``)."""
        self._on_orphaned = on_orphaned
        self._loop = loop
        loop.add_signal_handler(signal.SIGHUP, self._orphaned_in_loop)

    def _orphaned_in_loop(self) -> None:
        if not self._fired and self.orphaned():
            self._fired = True
            logger.warning("worker lost its supervisor (pid %d); stopping", self.parent)
            assert self._on_orphaned is not None
            self._on_orphaned()

    def _poll(self) -> None:
        while not self.orphaned():
            time.sleep(self.poll)
        loop = self._loop
        if loop is None:
            os._exit(EXIT_ORPHANED)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is on its way out
            loop.call_soon_threadsafe(self._orphaned_in_loop)
        time.sleep(self.patience)
        logger.warning("worker did not stop within %.1fs of losing its supervisor; exiting", self.patience)
        flush_logs()
        os._exit(EXIT_ORPHANED)


async def run_worker_process(
    target: str,
    broker: str,
    *,
    concurrency: int,
    lease: float,
    grace: float,
    retention: float | None,
    name: str | None = None,
    watch: ParentWatch | None = None,
) -> int:
    """The body of one worker process: serve until SIGTERM/SIGINT or orphaned; returns the exit code."""
    from ..service import load_service

    service = load_service(target, warn=False)  # the process that started it warned already
    options: dict[str, Any] = {}
    if retention is not None:
        options["retention"] = retention
    queue = Queue.from_url(broker, **options)
    with _runtime.scratch_dir(_runtime.store_key(broker)) as workdir:
        worker = Worker(service, queue, concurrency=concurrency, lease=lease, grace=grace, name=name, workdir=workdir)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        if watch is not None:

            def orphaned() -> None:
                # Nobody will wait for a drain: hand the tasks back now, for others to run.
                worker.grace = 0
                worker.stop()

            watch.attach(loop, orphaned)

        async def maintain() -> None:
            while True:
                await asyncio.sleep(1.0)
                try:
                    await queue.recover()
                except QueueUnavailable:
                    pass  # the worker's own loop reports the outage
                except Exception:
                    logger.exception("re-queueing the tasks of dead workers failed; trying again")

        maintainer = asyncio.create_task(maintain())
        try:
            await worker.run()
        finally:
            maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintainer
            await queue.close()
    return EXIT_RECYCLE if worker.recycle else 0
