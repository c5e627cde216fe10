"""The worker: builds the service once, then claims and runs tasks until told to stop.

One worker process runs up to ``concurrency`` tasks at once: ``async def`` tasks on its
event loop, plain ``def`` tasks in a thread each, so the loop stays free to renew leases and
hear cancels while a model call blocks.

Stopping a sync task: Python cannot kill a thread, so the worker raises an exception inside
it (which works while it runs Python code); if that does not end it within a few seconds
(it is stuck in C), the worker hands its other tasks back and exits, and the supervisor
starts a fresh process. That is the "interrupted or its worker recycled" of SPEC §4.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

try:
    import resource

    _RUSAGE_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None)  # Linux
except ImportError:  # Windows
    _RUSAGE_THREAD = None

from .._types import Claim, Outcome, TaskStatus
from ..exceptions import QueueUnavailable, Retry
from ..queue.base import DEFAULT_LEASE, Queue
from ..service import Endpoint, Service

logger = logging.getLogger("taskserve.worker")

EXIT_RECYCLE = 75  # asks the supervisor for a fresh process (a sync task could not be stopped)
QUICK_CALL = 0.0005  # a sync call this short may run on the event loop (see _Timing)
SLOW_CALL = 0.005  # one this long on the loop sends its function back to threads
FIRST_STREAK = 8  # quick calls in a row before a function first runs on the loop


class TaskInterrupted(BaseException):
    """Raised inside a sync task's thread to stop it (cancelled, timed out or shutting down)."""


@dataclass
class _SyncCall:
    lock: threading.Lock = field(default_factory=threading.Lock)
    thread_id: int | None = None
    finished: bool = False

    def interrupt(self) -> bool:
        with self.lock:
            if self.finished or self.thread_id is None:
                return False
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self.thread_id), ctypes.py_object(TaskInterrupted)
            )
            return True


def _voluntary_switches() -> int | None:
    """Times this thread gave up the CPU to wait (sleep, I/O, a lock); None where unknown."""
    if _RUSAGE_THREAD is None:
        return None
    return int(resource.getrusage(_RUSAGE_THREAD).ru_nvcsw)


@dataclass
class _Timing:
    """Decides whether a sync function is quick enough to run on the event loop itself.

    Handing a call to a thread and back costs more than a sub-millisecond model call (a
    lookup, a small scoring function). A function that ran under half a millisecond
    `needed` times in a row runs on the loop from then on. An inline run that holds the loop
    over 5 ms (busy on the CPU, or waiting on something), or a function whose CPU time
    creeps up, goes back to threads, and must earn its place again with four times as long
    a streak: so a function that is sometimes slow holds the loop up rarely.

    A run that took long by the clock but used little CPU and never waited was the machine
    being busy (this process preempted on a loaded box), not the function; it does not count.
    """

    needed: int = FIRST_STREAK
    streak: int = 0
    inline: bool = False
    cpu_avg: float = 0.0

    def ran_in_thread(self, wall: float) -> None:
        self.streak = self.streak + 1 if wall < QUICK_CALL else 0
        if self.streak >= self.needed:
            self.inline, self.cpu_avg = True, 0.0

    def ran_inline(self, wall: float, cpu: float, waited: bool | None, name: str) -> None:
        self.cpu_avg = 0.9 * self.cpu_avg + 0.1 * cpu
        held_up = wall > SLOW_CALL and (cpu > SLOW_CALL or waited is not False)
        if held_up or self.cpu_avg > 2 * QUICK_CALL:
            self.inline, self.streak = False, 0
            self.needed = min(self.needed * 4, 1 << 16)
            logger.info(
                "%s took %.1f ms (%.1f ms of CPU) on the event loop: in threads again until quick %d times in a row",
                name,
                wall * 1000,
                cpu * 1000,
                self.needed,
            )


@dataclass
class _Running:
    claim: Claim
    task: asyncio.Task[None] = None  # type: ignore[assignment]  # set right after creation
    sync: _SyncCall | None = None
    # Why we stop it: "cancelled" (by a user, drop the result), "lost" (lease gone),
    # "shutdown" (hand it back), "timeout".
    stop_reason: str | None = None


class Worker:
    """Claims tasks of ``service`` from ``queue`` and runs them.

    Args:
        service: what to run; instantiated once, in ``run``.
        queue: the broker.
        concurrency: tasks run at once by this process.
        lease: seconds a claim holds a task without renewal; a dead worker's tasks re-run after it.
        grace: seconds running tasks may take to finish when the worker is told to stop.
        name: identifies this worker in task records, default ``host:pid``.
        prefetch: extra tasks claimed ahead while tasks finish in milliseconds, so that
            a flood of quick tasks costs one claim per batch rather than per task.
    """

    def __init__(
        self,
        service: Service,
        queue: Queue,
        *,
        concurrency: int = 1,
        lease: float = DEFAULT_LEASE,
        grace: float = 30.0,
        name: str | None = None,
        prefetch: int = 256,
    ) -> None:
        self.service = service
        self.queue = queue
        self.concurrency = max(1, concurrency)
        self.lease = lease
        self.grace = grace
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.routes = [ep.route for ep in service.endpoints]
        self._endpoints = service.by_route
        self._running: dict[str, _Running] = {}
        self._stopping = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="taskserve-task")
        self._instance: Any = None
        self._tmp = tempfile.mkdtemp(prefix="taskserve-worker-")
        self.recycle = False
        self.completed = 0
        self.prefetch = prefetch
        self._buffer: collections.deque[Claim] = collections.deque()
        self._outbox: list[Outcome] = []
        self._outbox_ready = asyncio.Event()
        self._closing = False
        self._route_avg: dict[str, float] = {}  # moving average of run time per route, seconds
        self._timings: dict[str, _Timing] = {}

    def stop(self) -> None:
        """Stop claiming; running tasks get ``grace`` seconds, then go back to the queue."""
        self._stopping.set()

    async def run(self, *, burst: bool = False) -> None:
        """Serve until ``stop()``; with ``burst``, return once no task is due and none runs."""
        await self._connect()
        self.queue.cancel_listeners.append(self._on_cancel)
        self.queue.listen_for_cancel()
        if self._instance is None:
            self._instance = self.service.instantiate()
        logger.info("worker %s ready: %s, concurrency %d", self.name, ", ".join(self.routes), self.concurrency)
        keeper = asyncio.create_task(self._keep_leases())
        reporter = asyncio.create_task(self._report_loop())
        try:
            await self._loop(burst)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            await self._drain()
            self._closing = True
            self._outbox_ready.set()
            await reporter
            self.queue.cancel_listeners.remove(self._on_cancel)
            self._pool.shutdown(wait=False, cancel_futures=True)
            shutil.rmtree(self._tmp, ignore_errors=True)

    async def _connect(self) -> None:
        delay = 0.1
        while True:
            try:
                await self.queue.connect()
                return
            except QueueUnavailable as exc:
                logger.warning("worker %s: %s Retrying in %.1fs.", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _quick_routes(self) -> list[str]:
        # Claims held before a slot is free only pay off for quick tasks; slow ones (and
        # routes not seen yet) are left in the queue, where an idle worker can take them.
        return [r for r in self.routes if self._route_avg.get(r, 1.0) < 0.005]

    async def _claim(self, free: int) -> list[Claim]:
        """Claim for the free slots, and ahead of them while the work is quick."""
        quick = self._quick_routes()
        room = max(0, self.prefetch - len(self._buffer))
        every_route_quick = len(quick) == len(self.routes)
        # Outcomes not yet written go along with the claim: one commit for both.
        outcomes, self._outbox = self._outbox, []
        try:
            claims = await self.queue.finish_and_claim(
                outcomes, self.routes, self.name, limit=free + room if every_route_quick else free, lease=self.lease
            )
        except QueueUnavailable:
            self._outbox[:0] = outcomes  # the reporter retries them
            self._outbox_ready.set()
            raise
        if claims and quick and not every_route_quick and all(c.route in quick for c in claims):
            more = room - len(claims)
            if more > 0:
                with contextlib.suppress(QueueUnavailable):  # what we hold already is enough to go on
                    claims += await self.queue.claim(quick, self.name, limit=more, lease=self.lease)
        return claims

    async def _loop(self, burst: bool) -> None:
        idle = 0.01
        while not self._stopping.is_set():
            free = self.concurrency - len(self._running)
            if free > 0 and self._buffer:
                for _ in range(min(free, len(self._buffer))):
                    self._start(self._buffer.popleft())
                continue
            if free <= 0:
                self._slot_free.clear()
                await self._first(self._slot_free.wait())
                continue
            try:
                claims = await self._claim(free)
            except QueueUnavailable as exc:
                logger.warning("worker %s: %s; retrying in %.1fs", self.name, exc, idle)
                await self._first(asyncio.sleep(idle))
                idle = min(idle * 2, 5.0)
                continue
            if claims:
                idle = 0.01
                self._buffer.extend(claims)
                continue
            if burst and not self._running:
                return
            await self._first(self.queue.wait_for_work(self.routes, idle))
            idle = min(idle * 2, 1.0)

    async def _first(self, aw: Any) -> None:
        """Await ``aw`` unless a stop comes first."""
        waiter = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if waiter.done() and not waiter.cancelled() and waiter.exception() is not None:
                # The broker failed while we waited: the next claim reports and backs off.
                logger.debug("waiting for work failed: %s", waiter.exception())
        finally:
            for t in (waiter, stopper):
                if not t.done():
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t

    def _start(self, claim: Claim) -> None:
        endpoint = self._endpoints[claim.route]
        running = _Running(claim)
        self._running[claim.id] = running
        running.task = asyncio.create_task(self._execute(running, endpoint))

    async def _execute(self, running: _Running, endpoint: Endpoint) -> None:
        claim = running.claim
        outcome: Outcome | None
        workdir = os.path.join(self._tmp, claim.id)
        try:
            kwargs = endpoint.codec.load(claim.args, workdir)
            began = time.perf_counter()
            value = await self._call(running, endpoint, kwargs)
            took = time.perf_counter() - began
            self._route_avg[claim.route] = 0.8 * self._route_avg.get(claim.route, 1.0) + 0.2 * took
            body, content_type = endpoint.codec.dump_result(value)
            outcome = Outcome(claim.id, claim.token, TaskStatus.SUCCESS, result=body, content_type=content_type)
        except (asyncio.CancelledError, TaskInterrupted):
            outcome = self._stopped_outcome(running, endpoint)
        except Retry as exc:
            outcome = Outcome(
                claim.id, claim.token, TaskStatus.FAILURE, error=_describe(exc), retry=True, retry_delay=exc.delay
            )
        except Exception as exc:
            logger.info("task %s (%s) raised %s", claim.id, endpoint.name, _describe(exc))
            retry = bool(endpoint.retry_on) and isinstance(exc, endpoint.retry_on)
            outcome = Outcome(claim.id, claim.token, TaskStatus.FAILURE, error=_describe(exc), retry=retry)
        finally:
            if endpoint.codec.writes_files:
                shutil.rmtree(workdir, ignore_errors=True)
        if outcome is not None:
            # Recorded by the reporter in batches; until then the lease still covers the task.
            self._outbox.append(outcome)
            self._outbox_ready.set()
        self._running.pop(claim.id, None)
        self._slot_free.set()
        self.completed += 1

    def _stopped_outcome(self, running: _Running, endpoint: Endpoint) -> Outcome | None:
        claim = running.claim
        if running.stop_reason == "timeout":
            return Outcome(
                claim.id,
                claim.token,
                TaskStatus.FAILURE,
                error=f"TimeoutError: {endpoint.name} ran longer than its timeout of {endpoint.timeout}s",
            )
        if running.stop_reason == "shutdown":
            return Outcome(claim.id, claim.token, TaskStatus.PENDING)
        return None  # cancelled or lost: the store already says what happened

    async def _report_loop(self) -> None:
        """Write outcomes in batches: whatever piled up while the last write was under way."""
        loop = asyncio.get_running_loop()
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            # While quick tasks are lined up, let their outcomes pile up for a few ms: one
            # commit for many. With nothing lined up the outcome is written at once.
            deadline = loop.time() + 0.005
            while self._buffer and len(self._outbox) < 256 and loop.time() < deadline and not self._closing:
                await asyncio.sleep(0.001)
            batch, self._outbox = self._outbox, []
            if batch:
                await self._report(batch)
            elif self._closing:
                return

    async def _report(self, outcomes: list[Outcome]) -> None:
        delay = 0.05
        deadline = time.monotonic() + max(self.lease, 5.0)
        while True:
            try:
                await self.queue.finish(outcomes)
                return
            except QueueUnavailable as exc:
                # Past the lease the tasks will re-run elsewhere anyway; until then keep trying.
                if time.monotonic() > deadline:
                    logger.error("could not record the outcome of %d task(s): %s", len(outcomes), exc)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _call(self, running: _Running, endpoint: Endpoint, kwargs: dict[str, Any]) -> Any:
        fn = endpoint.fn
        if endpoint.is_async:
            coro = fn(self._instance, **kwargs)
            if endpoint.timeout is None:
                return await coro
            try:
                return await asyncio.wait_for(coro, endpoint.timeout)
            except asyncio.TimeoutError:
                running.stop_reason = "timeout"
                raise asyncio.CancelledError from None
        timing = self._timings.setdefault(endpoint.route, _Timing())
        if timing.inline and endpoint.timeout is None:
            began, cpu, switches = time.perf_counter(), time.thread_time(), _voluntary_switches()
            try:
                return fn(self._instance, **kwargs)
            finally:
                wall = time.perf_counter() - began
                waited = None if switches is None or wall <= SLOW_CALL else _voluntary_switches() != switches
                timing.ran_inline(wall, time.thread_time() - cpu, waited, endpoint.name)
        call = _SyncCall()
        running.sync = call

        def in_thread() -> Any:
            with call.lock:
                call.thread_id = threading.get_ident()
            began = time.perf_counter()
            try:
                return fn(self._instance, **kwargs)
            finally:
                timing.ran_in_thread(time.perf_counter() - began)
                with call.lock:
                    call.finished = True

        future = asyncio.get_running_loop().run_in_executor(self._pool, in_thread)
        if endpoint.timeout is None:
            return await future
        try:
            return await asyncio.wait_for(asyncio.shield(future), endpoint.timeout)
        except asyncio.TimeoutError:
            running.stop_reason = "timeout"
            await self._interrupt(running, future)
            raise TaskInterrupted from None

    async def _interrupt(self, running: _Running, future: asyncio.Future[Any]) -> None:
        """Stop a sync task's thread; recycle the process if it will not stop."""
        assert running.sync is not None
        running.sync.interrupt()
        try:
            await asyncio.wait_for(asyncio.shield(future), 3.0)
        except BaseException:
            pass
        if not future.done():
            logger.warning("task %s did not stop; recycling worker %s", running.claim.id, self.name)
            self.recycle = True
            self.stop()

    def _stop_task(self, task_id: str, reason: str) -> None:
        running = self._running.get(task_id)
        if running is None or running.stop_reason is not None:
            return
        running.stop_reason = reason
        if running.sync is not None:
            future = running.task
            asyncio.get_running_loop().create_task(self._stop_sync(running, future))
        else:
            running.task.cancel()

    async def _stop_sync(self, running: _Running, task: asyncio.Task[None]) -> None:
        assert running.sync is not None
        running.sync.interrupt()
        done, _ = await asyncio.wait({task}, timeout=3.0)
        if not done:
            logger.warning("task %s did not stop; recycling worker %s", running.claim.id, self.name)
            self.recycle = True
            self.stop()

    def _drop_buffered(self, task_ids: set[str]) -> None:
        if any(c.id in task_ids for c in self._buffer):
            self._buffer = collections.deque(c for c in self._buffer if c.id not in task_ids)

    def _on_cancel(self, task_id: str) -> None:
        self._drop_buffered({task_id})
        if task_id in self._running:
            logger.info("task %s cancelled; stopping it", task_id)
            self._stop_task(task_id, "cancelled")

    async def _keep_leases(self) -> None:
        """Renew leases; stop tasks whose lease is gone (cancelled, or presumed dead)."""
        interval = max(self.lease / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            held = {tid: r.claim.token for tid, r in self._running.items() if r.stop_reason is None}
            held.update((c.id, c.token) for c in self._buffer)
            try:
                kept = await self.queue.extend(held, self.lease)
            except QueueUnavailable as exc:
                logger.warning("worker %s could not renew leases: %s", self.name, exc)
                continue
            lost = held.keys() - kept
            self._drop_buffered(lost)
            for task_id in lost:
                self._stop_task(task_id, "lost")

    async def _drain(self) -> None:
        """Give running tasks ``grace`` seconds, then hand the rest back to the queue."""
        if self._buffer:
            self._outbox.extend(Outcome(c.id, c.token, TaskStatus.PENDING) for c in self._buffer)
            self._buffer.clear()
            self._outbox_ready.set()
        if not self._running:
            return
        logger.info("worker %s draining %d running task(s)", self.name, len(self._running))
        pending = {r.task for r in self._running.values()}
        _, still = await asyncio.wait(pending, timeout=self.grace if not self.recycle else 0)
        for running in list(self._running.values()):
            if running.task in still:
                self._stop_task(running.claim.id, "shutdown")
        if still:
            _, stuck = await asyncio.wait(still, timeout=5.0)
            # A thread that will not stop: release its task ourselves, the process is exiting.
            for running in list(self._running.values()):
                if running.task in stuck:
                    self._outbox.append(Outcome(running.claim.id, running.claim.token, TaskStatus.PENDING))
                    self.recycle = True


def _describe(exc: BaseException) -> str:
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
