"""Keeps N worker processes alive.

Workers are fresh interpreters (``python -m taskserve run-worker``), never forks of this
process, so CUDA and other libraries that break across ``fork`` work in them. Each runs in
its own session: a terminal's Ctrl-C reaches only the supervisor, which drains them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time

from .exceptions import QueueUnavailable
from .queue.base import Queue
from .worker import EXIT_RECYCLE

logger = logging.getLogger("taskserve.supervisor")


class Supervisor:
    """Starts ``workers`` processes running ``target`` and restarts any that exits.

    Args:
        target: ``module:Class`` of the service.
        broker: the broker URL the workers use.
        queue: this process's queue, used to re-queue a dead worker's tasks at once.
        options: passed to each worker: concurrency, lease, grace, retention.
    """

    def __init__(
        self,
        target: str,
        broker: str,
        queue: Queue | None,
        *,
        workers: int,
        concurrency: int = 1,
        lease: float = 30.0,
        grace: float = 30.0,
        retention: float | None = None,
    ) -> None:
        self.target = target
        self.broker = broker
        self.queue = queue
        self.workers = workers
        self.concurrency = concurrency
        self.lease = lease
        self.grace = grace
        self.retention = retention
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self._slots: list[asyncio.Task[None]] = []
        self._stopping = False
        self.restarts = 0

    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [p.pid for p in self.processes.values() if p.returncode is None]

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "taskserve", "run-worker", self.target, "--broker", self.broker]
        cmd += ["--concurrency", str(self.concurrency), "--lease", str(self.lease), "--grace", str(self.grace)]
        if self.retention is not None:
            cmd += ["--retention", str(self.retention)]
        return cmd

    async def start(self) -> None:
        self._slots = [asyncio.create_task(self._keep(i)) for i in range(self.workers)]

    async def _spawn(self) -> asyncio.subprocess.Process:
        env = {**os.environ, "TASKSERVE_SUPERVISED": "1"}
        return await asyncio.create_subprocess_exec(*self.command(), env=env, start_new_session=True)

    async def _keep(self, slot: int) -> None:
        backoff = 0.5
        while not self._stopping:
            started = time.monotonic()
            proc = await self._spawn()
            self.processes[slot] = proc
            logger.info("worker %d started (pid %d)", slot, proc.pid)
            code = await proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            if code == EXIT_RECYCLE:
                logger.warning("worker %d (pid %d) recycled to stop a task that would not stop", slot, proc.pid)
            else:
                logger.error("worker %d (pid %d) died with exit code %s; restarting it", slot, proc.pid, code)
            await self._requeue(proc.pid)
            # A worker that dies at once (a broken service) is restarted ever more slowly.
            backoff = 0.5 if time.monotonic() - started > 30 else min(backoff * 2, 30.0)
            await asyncio.sleep(backoff if code != EXIT_RECYCLE else 0)

    async def _requeue(self, pid: int) -> None:
        if self.queue is None:
            return
        with contextlib.suppress(QueueUnavailable):
            n = await self.queue.abandon(f"{socket.gethostname()}:{pid}")
            if n:
                logger.info("re-queued %d task(s) of the dead worker (pid %d)", n, pid)

    async def stop(self, *, force: bool = False) -> None:
        """SIGTERM every worker (they drain), SIGKILL those still there after the grace time."""
        self._stopping = True
        sig = signal.SIGKILL if force else signal.SIGTERM
        for proc in self.processes.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
        waits = [p.wait() for p in self.processes.values() if p.returncode is None]
        if waits:
            done, pending = await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=self.grace + 10)
            for proc in self.processes.values():
                if proc.returncode is None:
                    logger.warning("worker pid %d did not drain in time; killing it", proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            for w in pending:
                with contextlib.suppress(Exception):
                    await w
        for slot in self._slots:
            slot.cancel()
        for slot in self._slots:
            with contextlib.suppress(asyncio.CancelledError):
                await slot
