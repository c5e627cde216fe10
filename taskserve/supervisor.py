"""Keeps N worker processes alive.

Workers are fresh interpreters (``python -m taskserve run-worker``), never forks of this
process, so CUDA and other libraries that break across ``fork`` work in them. Each runs in
its own session: a terminal's Ctrl-C reaches only the supervisor, which drains them in order.

Each worker gets, through its environment: the broker URL (never in its command line, where
any user can read a password), this process's pid (it exits when we die, see
``worker.process.ParentWatch``) and an id of its own, unique across hosts and restarts, under
which it holds its tasks: when it dies, its tasks are re-queued by that id at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import time

from .devices import worker_env
from .exceptions import QueueUnavailable
from .queue.base import Queue
from .worker import EXIT_RECYCLE
from .worker.metrics import MULTIPROC_DIR, mark_dead
from .worker.process import SUPERVISOR_PID, WORKER_ID

logger = logging.getLogger("taskserve.supervisor")

KILL_AFTER = 1.0  # seconds past the grace a worker gets to hand its tasks back before SIGKILL


def worker_id() -> str:
    """A worker id no other process will have: pids repeat across containers and restarts."""
    return f"{socket.gethostname()}:{secrets.token_hex(6)}"


class Supervisor:
    """Starts ``workers`` processes running ``target`` and restarts any that exits.

    Args:
        target: ``module:Class`` of the service.
        broker: the broker URL the workers use.
        queue: this process's queue, used to re-queue a dead worker's tasks at once.
        options: passed to each worker: concurrency, lease, grace, retention.
        devices: the GPU ids of each worker slot (``devices.assign``), set as its
            ``CUDA_VISIBLE_DEVICES``; None leaves the environment's as it is.
        metrics_dir: the workers' ``PROMETHEUS_MULTIPROC_DIR``, owned by the caller, which
            reads their metrics from it (None: they keep them to themselves).
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
        devices: list[list[str]] | None = None,
        metrics_dir: str | None = None,
    ) -> None:
        self.metrics_dir = metrics_dir
        self.target = target
        self.devices = devices
        self.broker = broker
        self.queue = queue
        self.workers = workers
        self.concurrency = concurrency
        self.lease = lease
        self.grace = grace
        self.retention = retention
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.ids: dict[int, str] = {}  # pid -> worker id
        self._slots: list[asyncio.Task[None]] = []
        self._stopping = False
        self._stop_requested = asyncio.Event()
        self._force = False
        self.restarts = 0

    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [p.pid for p in self.processes.values() if p.returncode is None]

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "taskserve", "run-worker", self.target]
        cmd += ["--concurrency", str(self.concurrency), "--lease", str(self.lease), "--grace", str(self.grace)]
        if self.retention is not None:
            cmd += ["--retention", str(self.retention)]
        return cmd

    async def start(self) -> None:
        self._slots = [asyncio.create_task(self._keep(i)) for i in range(self.workers)]

    async def _spawn(self, slot: int) -> asyncio.subprocess.Process:
        wid = worker_id()
        env = {**os.environ, "TASKSERVE_BROKER": self.broker, SUPERVISOR_PID: str(os.getpid()), WORKER_ID: wid}
        if self.devices is not None:
            env.update(worker_env(self.devices[slot]))
        if self.metrics_dir is not None:
            env[MULTIPROC_DIR] = self.metrics_dir
        proc = await asyncio.create_subprocess_exec(*self.command(), env=env, start_new_session=True)
        self.ids[proc.pid] = wid
        return proc

    async def _keep(self, slot: int) -> None:
        backoff = 0.5
        while not self._stopping:
            started = time.monotonic()
            proc = await self._spawn(slot)
            self.processes[slot] = proc
            if self._stopping:  # stop() came while it was being started
                self._signal(proc)
            gpus = "" if self.devices is None else f", GPUs {','.join(self.devices[slot]) or 'none'}"
            logger.info("worker %d started (pid %d, id %s%s)", slot, proc.pid, self.ids[proc.pid], gpus)
            code = await proc.wait()
            if self.metrics_dir is not None:
                mark_dead(proc.pid, self.metrics_dir)
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
            if code != EXIT_RECYCLE:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop_requested.wait(), backoff)

    async def _requeue(self, pid: int) -> None:
        wid = self.ids.pop(pid, None)
        if self.queue is None or wid is None:
            return
        with contextlib.suppress(QueueUnavailable):
            n = await self.queue.abandon(wid)
            if n:
                logger.info("re-queued %d task(s) of the dead worker %s (pid %d)", n, wid, pid)

    async def stop(self, *, force: bool = False) -> None:
        """SIGTERM every worker (they drain), SIGKILL those still there just after the grace time.

        A worker bounds its drain and the reporting of its outcomes to the grace itself, even
        with the broker down; ``KILL_AFTER`` is only for one that cannot (stuck in C code).
        """
        self._stopping = True
        self._stop_requested.set()
        self._force = self._force or force
        for proc in self.processes.values():
            self._signal(proc)
        slots = [slot for slot in self._slots if not slot.done()]
        if slots:
            # Each slot returns once its worker has exited (one spawned meanwhile is signalled too).
            _, pending = await asyncio.wait(slots, timeout=self.grace + KILL_AFTER)
            if pending:
                for proc in self.processes.values():
                    if proc.returncode is None:
                        logger.warning("worker pid %d did not drain in time; killing it", proc.pid)
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                await asyncio.wait(pending, timeout=5)
        for slot in self._slots:
            slot.cancel()
        for slot in self._slots:
            with contextlib.suppress(asyncio.CancelledError):
                await slot

    def _signal(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL if self._force else signal.SIGTERM)
