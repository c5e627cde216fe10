"""The worker's own rules, with a real worker in this test's process on a real SQLite file.

The worker runs in burst mode (it returns once the queue is empty), so a test can look at
what ran, in which order and on which thread, and at what the store says afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import taskserve
from taskserve._types import NewTask, TaskStatus
from taskserve.queue import Queue
from taskserve.service import load_service
from taskserve.worker.core import Worker
from taskserve.worker.execute import SyncCall, TaskInterrupted

pytestmark = pytest.mark.anyio

CALLS: list[tuple[int, bool]] = []  # (x, ran on the main thread) per call, in order


@taskserve.service(name="threads")
class Threads:
    @taskserve.task
    def score(self, x: int, sleep_ms: float = 0, block_ms: float = 0) -> int:
        CALLS.append((x, threading.current_thread() is threading.main_thread()))
        time.sleep(block_ms / 1000)  # one call in C: an interruption waits until it returns
        end = time.monotonic() + sleep_ms / 1000
        while time.monotonic() < end:  # in short steps, so an interruption lands between two
            time.sleep(0.002)
        return x


SERVICE = load_service(f"{__name__}:Threads")


def args(**kwargs: float) -> bytes:
    return SERVICE.by_route["/score"].codec.validate(kwargs)


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[Queue]:
    queue = Queue.from_url(f"sqlite:///{tmp_path}/q.db")
    await queue.connect()
    CALLS.clear()
    yield queue
    await queue.close()


async def recover_often(queue: Queue) -> None:
    """What every process's maintenance does: re-queue tasks whose lease lapsed."""
    while True:
        await queue.recover()
        await asyncio.sleep(0.05)


async def test_sync_functions_never_run_on_the_event_loop(queue: Queue) -> None:
    tasks = [NewTask("/score", args(x=i)) for i in range(60)]
    await queue.enqueue_many(tasks)
    await Worker(SERVICE, queue, name="w").run(burst=True)
    assert sorted(x for x, _ in CALLS) == list(range(60))
    assert not any(on_loop for _, on_loop in CALLS)
    assert [(await queue.get(t.id)).status for t in tasks] == [TaskStatus.SUCCESS] * 60


async def test_a_blocking_call_keeps_its_lease_while_it_runs(queue: Queue) -> None:
    task = await queue.enqueue(NewTask("/score", args(x=1, sleep_ms=1500)))
    recoverer = asyncio.create_task(recover_often(queue))
    try:
        await Worker(SERVICE, queue, name="w", lease=0.4).run(burst=True)
    finally:
        recoverer.cancel()
    record = await queue.get(task.id)
    assert (record.status, record.attempts) == (TaskStatus.SUCCESS, 1)
    assert [x for x, _ in CALLS] == [1]


async def test_a_drain_longer_than_the_lease_keeps_renewing_and_records_the_result(queue: Queue) -> None:
    task = await queue.enqueue(NewTask("/score", args(x=7, sleep_ms=1500)))
    worker = Worker(SERVICE, queue, name="w", lease=0.4, grace=10)
    recoverer = asyncio.create_task(recover_often(queue))
    run = asyncio.create_task(worker.run())
    try:
        while not CALLS:
            await asyncio.sleep(0.01)
        worker.stop()  # SIGTERM: the running task gets its grace, far longer than the lease
        await asyncio.wait_for(run, 10)
    finally:
        recoverer.cancel()
    record = await queue.get(task.id)
    assert (record.status, record.attempts) == (TaskStatus.SUCCESS, 1)
    assert await queue.get_result(task.id) is not None


@pytest.mark.interrupts_threads
async def test_a_per_task_timeout_applies_where_the_endpoint_has_none(queue: Queue) -> None:
    task = await queue.enqueue(NewTask("/score", args(x=3, sleep_ms=3000), timeout=0.3, max_attempts=1))
    began = time.monotonic()
    await Worker(SERVICE, queue, name="w").run(burst=True)
    record = await queue.get(task.id)
    assert record.status is TaskStatus.FAILURE
    assert record.error is not None and record.error.startswith("TimeoutError")
    assert time.monotonic() - began < 2.5


async def test_an_urgent_task_overtakes_claims_buffered_ahead(queue: Queue) -> None:
    low = [NewTask("/score", args(x=i, sleep_ms=10)) for i in range(40)]
    await queue.enqueue_many(low)
    worker = Worker(SERVICE, queue, name="w")
    worker._route_avg["/score"] = 0.0001  # known to be quick: it claims all 40 at once
    run = asyncio.create_task(worker.run(burst=True))
    while not CALLS:
        await asyncio.sleep(0.001)
    await queue.enqueue(NewTask("/score", args(x=100), priority=10))
    await asyncio.wait_for(run, 20)
    order = [x for x, _ in CALLS]
    assert len(order) == 41
    assert order.index(100) < 10, f"the urgent task waited behind buffered ones: {order}"


async def test_a_cancel_wake_up_for_a_task_still_held_does_not_stop_it(queue: Queue) -> None:
    task = await queue.enqueue(NewTask("/score", args(x=5, sleep_ms=600)))
    worker = Worker(SERVICE, queue, name="w")
    run = asyncio.create_task(worker.run(burst=True))
    while not CALLS:
        await asyncio.sleep(0.01)
    worker._on_cancel(task.id)  # a stray datagram: the store never cancelled it
    await asyncio.wait_for(run, 10)
    assert (await queue.get(task.id)).status is TaskStatus.SUCCESS


async def test_a_claim_whose_lease_may_have_lapsed_is_not_started(queue: Queue) -> None:
    task = await queue.enqueue(NewTask("/score", args(x=9)))
    worker = Worker(SERVICE, queue, name="w", lease=1.0)
    [claim] = await queue.claim(["/score"], "w", lease=1.0)
    worker.buffer.hold([claim], time.monotonic() - 2.0)  # claimed long ago, never renewed: maybe re-queued since
    assert worker.buffer.pop() is None
    assert CALLS == [] and (await queue.get(task.id)).status is TaskStatus.IN_PROGRESS


@pytest.mark.interrupts_threads
def test_interrupting_a_call_as_it_returns_never_harms_the_pool_thread() -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    rng = random.Random(1)

    def work() -> int:
        end = time.perf_counter() + 0.0002
        while time.perf_counter() < end:
            pass
        return 1

    try:
        for _ in range(300):
            call = SyncCall()
            future = pool.submit(call.run, work)
            while call.thread_id is None and not future.done():
                pass
            end = time.perf_counter() + rng.uniform(0, 0.0004)
            while time.perf_counter() < end:
                pass
            call.interrupt()
            with contextlib.suppress(TaskInterrupted):
                future.result(timeout=5)
        # The pool's one thread still takes work: an interruption never landed in its own code.
        assert pool.submit(lambda: 42).result(timeout=5) == 42
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


@pytest.mark.interrupts_threads
async def test_quick_tasks_run_in_sequence_and_a_cancel_stops_only_its_own(queue: Queue) -> None:
    tasks = [NewTask("/score", args(x=i, sleep_ms=3000 if i == 1 else 0)) for i in range(3)]
    await queue.enqueue_many(tasks)
    worker = Worker(SERVICE, queue, name="w")
    worker._route_avg["/score"] = 0.0001  # known to be quick: the three go to one thread hop
    run = asyncio.create_task(worker.run(burst=True))
    while 1 not in [x for x, _ in CALLS]:
        await asyncio.sleep(0.01)
    began = time.monotonic()
    await queue.cancel(tasks[1].id)
    await asyncio.wait_for(run, 10)
    assert time.monotonic() - began < 2.0, "the cancelled call was interrupted, not waited for"
    statuses = [(await queue.get(t.id)).status for t in tasks]
    assert statuses == [TaskStatus.SUCCESS, TaskStatus.CANCELLED, TaskStatus.SUCCESS]


@pytest.mark.interrupts_threads
async def test_a_drain_that_gives_up_on_a_stuck_sequence_keeps_what_already_ran(queue: Queue) -> None:
    tasks = [NewTask("/score", args(x=i, block_ms=2000 if i == 1 else 0)) for i in range(3)]
    await queue.enqueue_many(tasks)
    worker = Worker(SERVICE, queue, name="w", grace=0.1)
    worker._route_avg["/score"] = 0.0001  # known to be quick: the three go to one thread hop
    run = asyncio.create_task(worker.run())
    while 1 not in [x for x, _ in CALLS]:
        await asyncio.sleep(0.01)
    worker.stop()  # the grace ends while task 1 is stuck in C code
    await asyncio.wait_for(run, 5)
    assert worker.recycle, "a call that would not stop asks for a fresh process"
    records = [await queue.get(t.id) for t in tasks]
    # Task 0 returned before the drain gave up: its result stands, it is not run a second time.
    assert (records[0].status, records[0].attempts) == (TaskStatus.SUCCESS, 1)
    assert [r.status for r in records[1:]] == [TaskStatus.PENDING, TaskStatus.PENDING]
    assert [x for x, _ in CALLS] == [0, 1]


async def test_a_worker_makes_its_scratch_directory_when_it_runs_and_removes_it(
    queue: Queue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Constructing a Worker (tests, embedders) creates nothing; a run leaves nothing behind."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    Worker(SERVICE, queue, name="never-run")
    assert list(scratch.iterdir()) == []
    record = await queue.enqueue(NewTask("/score", args(x=1)))
    await Worker(SERVICE, queue, name="w").run(burst=True)
    assert (await queue.get(record.id)).status is TaskStatus.SUCCESS
    assert list(scratch.iterdir()) == []


async def test_a_worker_stopped_as_it_starts_ends_at_once(tmp_path: Path) -> None:
    # Its first heartbeat's wake-up and the stop land together: the stop must not be lost
    # (it was, on Python 3.11, for a whole heartbeat period: a server stopped 30 s late).
    for delay in (0.0, 0.01, 0.1):
        queue = Queue.from_url(f"sqlite:///{tmp_path}/tasks-{delay}.db")
        worker = Worker(SERVICE, queue, concurrency=2, lease=2, name="quick")
        running = asyncio.create_task(worker.run())
        await asyncio.sleep(delay)
        worker.stop()
        await asyncio.wait_for(running, 5)
        await queue.close()
