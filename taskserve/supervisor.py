"""Keeps N worker processes alive.

Workers are fresh interpreters (``python -m taskserve run-worker``), never forks of this
process, so CUDA and other libraries that break across ``fork`` work in them. Each runs in
its own session: a terminal's Ctrl-C reaches only the supervisor, which drains them in order.

Each worker gets, through its environment: the broker URL (never in its command line, where
any user can read a password), this process's pid (it exits when we die, see
``worker.process.ParentWatch``) and an id of its own, unique across hosts and restarts, under
which it holds its tasks: when it dies, its tasks are re-queued by that id at once.

Two watches run beside the workers. On SQLite, a worker that has held the store's write lock
longer than ``lock_timeout`` (it froze inside a transaction: every other process's writes
wait on it, and nothing else can end it) is killed and replaced; see ``_sqlite_lockstamps``.
And the store's runtime directory is swept when a worker dies and every ``SWEEP_EVERY``
seconds, so the uploads a killed worker had written to its scratch directory do not outlive it.
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

from . import _runtime
from ._aio import wait_event
from .devices import worker_env
from .exceptions import QueueUnavailable
from .queue._sqlite_lockstamps import ENV as LOCK_STAMPS, StampBoard
from .queue.base import Queue
from .worker import EXIT_RECYCLE
from .worker.metrics import MULTIPROC_DIR, mark_dead
from .worker.process import SUPERVISOR_PID, WORKER_ID

logger = logging.getLogger("taskserve.supervisor")

KILL_AFTER = 1.0  # seconds past the grace a worker gets to hand its tasks back before SIGKILL
DEFAULT_LOCK_TIMEOUT = 5.0  # seconds; our transactions take milliseconds
SWEEP_EVERY = 30.0  # seconds between sweeps of the runtime directory (and at each worker's death)


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
        lock_timeout: on a SQLite broker, kill (SIGKILL: a stopped process ignores SIGTERM) and
            replace a worker that has held the store's write lock this many seconds; None: never.
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
        lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        self.metrics_dir = metrics_dir
        self.lock_timeout = lock_timeout
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
        self.lock_kills = 0
        self._store = _runtime.store_key(broker)
        self._files = contextlib.ExitStack()
        self._board: StampBoard | None = None
        self._watcher: asyncio.Task[None] | None = None

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
        if self.lock_timeout and self.broker.startswith("sqlite:"):
            directory = self._files.enter_context(_runtime.scratch_dir(self._store, _runtime.LOCKS))
            self._board = StampBoard(directory, self.workers)
            self._files.callback(self._board.close)
        self._slots = [asyncio.create_task(self._keep(i)) for i in range(self.workers)]
        self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """Kill workers frozen holding the write lock; sweep what dead processes left behind."""
        every = 1.0 if not self.lock_timeout else min(0.5, self.lock_timeout / 4)
        last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(every)
            if self._board is not None and self.lock_timeout:
                self._kill_lock_holders(self._board, self.lock_timeout)
            if time.monotonic() - last_sweep > SWEEP_EVERY:
                last_sweep = time.monotonic()
                await self._sweep()

    def _kill_lock_holders(self, board: StampBoard, limit: float) -> None:
        for slot, proc in list(self.processes.items()):
            if proc.returncode is not None:
                continue
            held = board.held_for(slot)
            if held > limit:
                logger.error(
                    "worker %d (pid %d) has held the SQLite write lock for %.1fs (over --lock-timeout %gs): it is "
                    "frozen, and every write waits on it; killing it",
                    slot,
                    proc.pid,
                    held,
                    limit,
                )
                board.reset(slot)  # once: it dies with the lock, which SQLite then frees
                self.lock_kills += 1
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    async def _sweep(self) -> None:
        """Remove what killed processes left in the store's runtime directory (their uploads)."""
        try:
            swept = await asyncio.to_thread(_runtime.sweep, _runtime.runtime_dir(self._store))
        except OSError as exc:
            logger.warning("cannot sweep the runtime directory: %s", exc)
            return
        if swept:
            logger.info("removed %d file(s) or directories left by dead processes", swept)

    async def _spawn(self, slot: int) -> asyncio.subprocess.Process:
        wid = worker_id()
        env = {**os.environ, "TASKSERVE_BROKER": self.broker, SUPERVISOR_PID: str(os.getpid()), WORKER_ID: wid}
        if self._board is not None:
            self._board.reset(slot)
            env[LOCK_STAMPS] = self._board.env(slot)
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
            await self._sweep()  # its scratch directory (uploads of the tasks it ran), now unlocked
            # A worker that dies at once (a broken service) is restarted ever more slowly.
            backoff = 0.5 if time.monotonic() - started > 30 else min(backoff * 2, 30.0)
            if code != EXIT_RECYCLE:
                await wait_event(self._stop_requested, backoff)

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
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        self._files.close()

    def _signal(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL if self._force else signal.SIGTERM)
