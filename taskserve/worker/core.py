"""The worker: builds the service once, then claims and runs tasks until told to stop.

One worker process runs up to ``concurrency`` tasks at once: ``async def`` tasks on its
event loop, plain ``def`` tasks in a thread each (``execute.py``), so the loop stays free to
renew leases, send heartbeats and hear cancels while a model call blocks (``lease.py``).

Claims not started yet wait in a buffer ordered by priority. A claim is started only while
its lease surely holds: one whose lease may have lapsed (the loop was held up, the broker
away) is dropped unstarted, since the store may already have handed it to someone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from typing import Any

from .._types import Claim, Outcome, TaskStatus
from ..exceptions import QueueUnavailable
from ..queue.base import DEFAULT_LEASE, Queue
from ..service import Service
from ..tracing import end_runs, start_runs
from .claim import ClaimBuffer
from .execute import UNSTARTED, Executor, Running
from .lease import Keeper
from .metrics import flush as flush_metrics, observe, worker_started, worker_stopped

logger = logging.getLogger("taskserve.worker")

EXIT_RECYCLE = 75  # asks the supervisor for a fresh process (a sync task could not be stopped)
QUICK_ROUTE = 0.005  # a route whose calls average less than this (seconds) is claimed ahead
URGENT_CHECK = 0.02  # while claims wait in the buffer, look this often for more urgent work
SEQUENCE_MAX = 64  # quick sync tasks of one route run together in one thread hop, at most this many


class Worker:
    """Claims tasks of ``service`` from ``queue`` and runs them.

    Args:
        service: what to run; instantiated once, in ``run``.
        queue: the broker.
        concurrency: tasks run at once by this process.
        lease: seconds a claim holds a task without renewal; a dead worker's tasks re-run after it.
        grace: seconds running tasks may take to finish when the worker is told to stop.
        name: identifies this worker in task records and the worker registry; unique per process.
        prefetch: extra tasks claimed ahead while tasks finish in milliseconds, so that
            a flood of quick tasks costs one claim per batch rather than per task.
        workdir: a scratch directory for uploaded files, owned by the caller; by default
            a temporary one that the worker removes when it stops.
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
        workdir: str | None = None,
    ) -> None:
        self.service = service
        self.queue = queue
        self.concurrency = max(1, concurrency)
        self.lease = lease
        self.grace = grace
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.routes = [ep.route for ep in service.endpoints]
        # Concurrency caps are enforced by the store's claim, across every worker of every host.
        queue.caps.update({ep.route: ep.concurrency for ep in service.endpoints if ep.concurrency is not None})
        self._endpoints = service.by_route
        self._running: dict[str, Running] = {}
        self._slots = 0  # calls under way: a single task, or a sequence of quick ones
        self._stopping = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._own_workdir = workdir is None
        self._workdir = workdir or ""  # else made by run(): a Worker that never runs leaves nothing behind
        self.executor = Executor(self.concurrency, self._workdir, queue)
        self.recycle = False
        self.completed = 0
        self.failed = 0
        self.prefetch = prefetch
        self.buffer = ClaimBuffer(lease)  # claimed, not started yet
        self._outbox: list[Outcome] = []
        self._outbox_ready = asyncio.Event()
        self._closing = False
        self._route_avg: dict[str, float] = {}  # moving average of run time per route, seconds
        self._last_urgent_check = 0.0
        self.state = "starting"
        self.started_at = time.time()
        self.keeper = Keeper(self)

    def stop(self) -> None:
        """Stop claiming; running tasks get ``grace`` seconds, then go back to the queue."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def running_ids(self) -> list[str]:
        return list(self._running)

    async def run(self, *, burst: bool = False) -> None:
        """Serve until ``stop()``; with ``burst``, return once no task is due and none runs."""
        if self._own_workdir:
            self._workdir = self.executor.workdir = tempfile.mkdtemp(prefix="taskserve-worker-")
        try:
            await self._serve(burst)
        finally:
            if self._own_workdir:
                shutil.rmtree(self._workdir, ignore_errors=True)

    async def _serve(self, burst: bool) -> None:
        await self._connect()
        self.queue.cancel_listeners.append(self._on_cancel)
        self.queue.listen_for_cancel()
        self.keeper.start()  # heartbeats say "starting" while the service is built
        try:
            if self.executor.instance is None:
                loop = asyncio.get_running_loop()
                # In a thread: a model that takes a minute to load must not stop the heartbeats.
                self.executor.instance = await loop.run_in_executor(self.executor.pool, self.service.instantiate)
            self.state = "ready"
            worker_started()
            self.keeper.beat_soon()
            logger.info(
                "worker %s ready: %s, concurrency %d | broker %s",
                self.name,
                ", ".join(self.routes),
                self.concurrency,
                self.queue.describe(),
            )
            reporter = asyncio.create_task(self._report_loop())
            try:
                await self._loop(burst)
            finally:
                self.state = "stopping"
                worker_stopped()
                await self._drain()
                self._closing = True
                self._outbox_ready.set()
                await reporter
                flush_metrics()
        finally:
            await self.keeper.stop()
            self.queue.cancel_listeners.remove(self._on_cancel)
            self.executor.close()

    async def _connect(self) -> None:
        delay = 0.1
        while True:
            try:
                await self.queue.connect()
                return
            except QueueUnavailable as exc:
                if self.stopping:
                    raise
                logger.warning("worker %s: %s Retrying in %.1fs.", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- claiming --------------------------------------------------------------------------

    def _quick_routes(self) -> list[str]:
        # Claims held before a slot is free only pay off for quick tasks; slow ones (and
        # routes not seen yet) are left in the queue, where an idle worker can take them.
        # So are capped routes: a claim held unstarted would take a slot another worker could use.
        caps = self.queue.caps
        return [r for r in self.routes if self._route_avg.get(r, 1.0) < QUICK_ROUTE and r not in caps]

    async def _claim(self, free: int) -> None:
        """Claim for the free slots, and ahead of them while the work is quick."""
        quick = self._quick_routes()
        room = max(0, self.prefetch - len(self.buffer))
        every_route_quick = len(quick) == len(self.routes)
        # Outcomes not yet written go along with the claim: one commit for both.
        outcomes, self._outbox = self._outbox, []
        if outcomes:
            flush_metrics()
        since = time.monotonic()
        try:
            claims = await self.queue.finish_and_claim(
                outcomes, self.routes, self.name, limit=free + room if every_route_quick else free, lease=self.lease
            )
        except QueueUnavailable:
            self._outbox[:0] = outcomes  # the reporter retries them
            self._outbox_ready.set()
            raise
        self.buffer.hold(claims, since)
        if claims and quick and not every_route_quick and all(c.route in quick for c in claims):
            more = room - len(claims)
            if more > 0:
                with contextlib.suppress(QueueUnavailable):  # what we hold already is enough to go on
                    since = time.monotonic()
                    self.buffer.hold(await self.queue.claim(quick, self.name, limit=more, lease=self.lease), since)
        self._last_urgent_check = time.monotonic()

    async def _claim_urgent(self, free: int) -> None:
        """With claims waiting in the buffer, take first any newer work of higher priority.

        Otherwise an ``@api`` call (priority 10) would wait behind up to ``prefetch`` tasks
        this worker claimed ahead.
        """
        now = time.monotonic()
        if now - self._last_urgent_check < URGENT_CHECK:
            return
        self._last_urgent_check = now
        top = self.buffer.top_priority
        with contextlib.suppress(QueueUnavailable):
            urgent = await self.queue.claim(self.routes, self.name, limit=free, lease=self.lease, min_priority=top + 1)
            self.buffer.hold(urgent, now)

    async def _fill_batch(self, claim: Claim) -> list[Claim]:
        """A batch for ``claim``'s batchable route: what is buffered, then what the queue holds.

        Waits up to the endpoint's ``max_latency_ms`` for more only while the queue has fewer
        than a full batch; a backlog is taken at once.
        """
        endpoint = self._endpoints[claim.route]
        want = endpoint.max_batch_size
        deadline = time.monotonic() + endpoint.max_latency_ms / 1000
        while len(self.buffer) < self.prefetch and self.buffer.count(claim.route) + 1 < want:
            since = time.monotonic()
            try:
                more = await self.queue.claim([claim.route], self.name, limit=want, lease=self.lease)
            except QueueUnavailable:
                break
            self.buffer.hold(more, since)
            if more:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.stopping:
                break
            await self._first(self.queue.wait_for_work([claim.route], remaining))
            if time.monotonic() >= deadline:
                deadline = time.monotonic()  # one more claim for what woke us, then go
        return [claim, *self.buffer.pop_route(claim.route, want - 1)]

    async def _start_buffered(self, free: int) -> None:
        for _ in range(free):
            if self.stopping:
                return  # what is still buffered is handed back by the drain
            claim = self.buffer.pop()
            if claim is None:
                return
            endpoint = self._endpoints[claim.route]
            if endpoint.batchable:
                self._start(await self._fill_batch(claim))
                continue
            quick = self._route_avg.get(claim.route, 1.0) < QUICK_ROUTE
            limited = claim.timeout is not None or endpoint.timeout is not None or claim.deadline is not None
            if endpoint.is_async or not quick or limited:
                self._start([claim])
                continue
            sequence = [claim]
            while len(sequence) < SEQUENCE_MAX and (more := self.buffer.pop(like=claim)) is not None:
                sequence.append(more)
            self._start(sequence)

    async def _loop(self, burst: bool) -> None:
        idle = 0.01
        while not self.stopping:
            free = self.concurrency - self._slots
            if free > 0 and self.buffer:
                await self._claim_urgent(free)
                await self._start_buffered(free)
                continue
            if free <= 0:
                self._slot_free.clear()
                await self._first(self._slot_free.wait())
                continue
            try:
                await self._claim(free)
            except QueueUnavailable as exc:
                logger.warning("worker %s: %s; retrying in %.1fs", self.name, exc, idle)
                await self._first(asyncio.sleep(idle))
                idle = min(idle * 2, 5.0)
                continue
            if self.buffer:
                idle = 0.01
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

    # -- running ---------------------------------------------------------------------------

    def _start(self, claims: list[Claim]) -> None:
        """Start one task, or a sequence of quick sync ones in one thread hop, in one slot."""
        batched = len(claims) > 1 or self._endpoints[claims[0].route].batchable
        runnings = [Running(claim, self._endpoints[claim.route], in_sequence=batched) for claim in claims]
        task = asyncio.create_task(self._execute(runnings))
        for running in runnings:
            running.task = task
            self._running[running.claim.id] = running
        self._slots += 1

    async def _execute(self, runnings: list[Running]) -> None:
        began = time.perf_counter()
        spans = start_runs(runnings)
        try:
            if runnings[0].endpoint.batchable:
                outcomes = await self.executor.run_batch(runnings)
            elif len(runnings) == 1:
                outcomes = [await self.executor.run(runnings[0])]
            else:
                outcomes = await self.executor.run_sequence(runnings)
        except BaseException:
            end_runs(spans, [None] * len(runnings))
            raise
        end_runs(spans, outcomes)
        took = (time.perf_counter() - began) / len(runnings)
        observe(runnings, outcomes, time.time())
        route = runnings[0].claim.route
        self._route_avg[route] = 0.8 * self._route_avg.get(route, 1.0) + 0.2 * took
        for running, outcome in zip(runnings, outcomes, strict=True):
            if self._running.pop(running.claim.id, None) is None:
                continue  # the drain gave up on it and already reported it
            if outcome is UNSTARTED:  # the sequence ran out of time: back to the buffer, or to the queue
                claim = running.claim
                if self.stopping:
                    self._outbox.append(Outcome(claim.id, claim.token, TaskStatus.PENDING))
                else:
                    self.buffer.push_back(claim)
                continue
            self.completed += 1
            if outcome is not None:
                # Recorded by the reporter in batches; until then the lease still covers the task.
                self._outbox.append(outcome)
                if outcome.status is TaskStatus.FAILURE:
                    self.failed += 1
        self._outbox_ready.set()
        self._slots -= 1
        self._slot_free.set()
        if self.executor.stuck and not self.recycle:
            self.recycle = True
            self.stop()

    def stop_task(self, task_id: str, reason: str) -> None:
        """Stop a running task: its asyncio task is cancelled, or its sync call's thread interrupted.

        A task in a sequence shares its asyncio task with the others: only its own call is
        interrupted, or it is skipped if it has not started.
        """
        running = self._running.get(task_id)
        if running is None or running.stop_reason is not None:
            return
        running.stop_reason = reason
        if not running.in_sequence:
            running.task.cancel()
        elif running.sync is not None:
            running.sync.interrupt()

    def drop_buffered(self, task_ids: set[str]) -> None:
        self.buffer.drop(task_ids)
        for task_id in task_ids:
            if task_id not in self._running:
                self.buffer.done(task_id)

    def held(self) -> dict[str, str]:
        """``{task_id: token}`` of every claim this worker holds: running and buffered."""
        # Stopping tasks too: a timed-out call has its outcome to write yet, under its lease.
        held = {tid: r.claim.token for tid, r in self._running.items()}
        held.update((claim.id, claim.token) for claim in self.buffer.claims())
        return held

    def _on_cancel(self, task_id: str) -> None:
        if task_id in self._running or task_id in self.buffer.held_until:
            # A wake-up says so; the store decides. Ask it before stopping anything.
            asyncio.get_running_loop().create_task(self.keeper.check_cancelled(task_id))

    # -- outcomes --------------------------------------------------------------------------

    async def _report_loop(self) -> None:
        """Write outcomes in batches: whatever piled up while the last write was under way."""
        loop = asyncio.get_running_loop()
        while True:
            # Closing: write what is left until nothing is, without waiting for a wake-up that a
            # batch written just before the close may already have consumed (it hung the stop).
            if not self._closing:
                await self._outbox_ready.wait()
            self._outbox_ready.clear()
            # While quick tasks are lined up, let their outcomes pile up for a few ms: one
            # commit for many. With nothing lined up the outcome is written at once.
            deadline = loop.time() + 0.005
            while self.buffer and len(self._outbox) < 256 and loop.time() < deadline and not self._closing:
                await asyncio.sleep(0.001)
            batch, self._outbox = self._outbox, []
            if batch:
                await self._report(batch)
            elif self._closing:
                return

    async def _report(self, outcomes: list[Outcome]) -> None:
        flush_metrics()
        delay = 0.05
        # Past the lease the tasks will re-run elsewhere anyway; when closing, the grace bounds it.
        deadline = time.monotonic() + (0.5 if self._closing else max(self.lease, 5.0))
        while True:
            try:
                await self.queue.finish(outcomes)
            except QueueUnavailable as exc:
                if time.monotonic() > deadline:
                    logger.error("could not record the outcome of %d task(s): %s", len(outcomes), exc)
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            except Exception:
                logger.exception("recording the outcome of %d task(s) failed", len(outcomes))
                break
            else:
                break
        for outcome in outcomes:
            self.buffer.done(outcome.id)

    async def _drain(self) -> None:
        """Give running tasks ``grace`` seconds, then hand the rest back to the queue."""
        unstarted = self.buffer.take_all()
        handed_back = len(unstarted)
        if unstarted:
            self._outbox.extend(Outcome(c.id, c.token, TaskStatus.PENDING) for c in unstarted)
            self._outbox_ready.set()
        if self._running:
            logger.info("worker %s draining %d running task(s)", self.name, len(self._running))
            pending = {r.task for r in self._running.values()}
            _, still = await asyncio.wait(pending, timeout=self.grace if not self.recycle else 0)
            for running in list(self._running.values()):
                if running.task in still:
                    self.stop_task(running.claim.id, "shutdown")
                    handed_back += 1
            if still:
                await asyncio.wait(still, timeout=0.5)
                # A thread that will not stop: report for it ourselves, the process is exiting.
                # Tasks of a sequence that did end keep their outcome; the rest go back.
                for running in list(self._running.values()):
                    if running.task in still and not running.task.done():
                        del self._running[running.claim.id]
                        outcome = self.executor.settle(running, running.ended)
                        if outcome is not None:
                            self._outbox.append(outcome)
                        self.recycle = True
                self._outbox_ready.set()
        if handed_back:
            logger.info("worker %s handed %d unfinished task(s) back to the queue", self.name, handed_back)
