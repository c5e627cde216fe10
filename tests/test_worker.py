"""Where a worker runs sync functions: on its event loop while they are quick, in threads otherwise.

A worker runs in this test's own process on a real SQLite file, in burst mode (it returns
once the queue is empty), so the test can see which thread each call ran on.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import taskserve
from taskserve._types import NewTask, TaskStatus
from taskserve.queue import Queue
from taskserve.service import load_service
from taskserve.worker.core import FIRST_STREAK, Worker, _Timing

pytestmark = pytest.mark.anyio

CALLS: list[tuple[int, bool]] = []  # (x, ran on the main thread) per call, in order


@taskserve.service(name="threads")
class Threads:
    @taskserve.task
    def score(self, x: int, sleep_ms: float = 0) -> int:
        CALLS.append((x, threading.current_thread() is threading.main_thread()))
        if sleep_ms:
            time.sleep(sleep_ms / 1000)
        return x


def args(**kwargs: float) -> bytes:
    return load_service(f"{__name__}:Threads").by_route["/score"].codec.validate(kwargs)


async def test_a_quick_sync_function_moves_to_the_loop_and_a_blocking_one_back_to_threads(tmp_path: Path) -> None:
    queue = Queue.from_url(f"sqlite:///{tmp_path}/q.db")
    await queue.connect()
    # One task at a time, in submission order, so the calls happen in this order.
    worker = Worker(load_service(f"{__name__}:Threads"), queue, name="w", prefetch=0)
    quick = [NewTask("/score", args(x=i)) for i in range(100)]
    # Then one call that waits (a sleep, as a network call would), and two more quick ones.
    tail = [NewTask("/score", args(x=100, sleep_ms=20)), NewTask("/score", args(x=101)), NewTask("/score", args(x=102))]
    CALLS.clear()
    try:
        for task in quick + tail:
            await queue.enqueue(task)
        await worker.run(burst=True)
        for task in quick + tail:
            assert (await queue.get(task.id)).status is TaskStatus.SUCCESS
    finally:
        await queue.close()
    assert [x for x, _ in CALLS] == [*range(100), 100, 101, 102]
    on_loop = [main for _, main in CALLS[:100]]
    first = on_loop.index(True)
    assert first >= FIRST_STREAK, "the first calls run in threads, while the worker learns how long they take"
    assert all(on_loop[first:]), "after a streak of quick calls it stays on the event loop"
    # The sleeping call held the loop once; after it the function is back in threads.
    assert [main for _, main in CALLS[100:]] == [True, False, False]


def test_being_preempted_is_not_the_function_being_slow() -> None:
    timing = _Timing(needed=4)
    for _ in range(4):
        timing.ran_in_thread(0.0001)
    assert timing.inline
    # 8 ms by the clock, 0.1 ms of CPU, no wait: the process was descheduled on a busy box.
    timing.ran_inline(0.008, 0.0001, waited=False, name="f")
    assert timing.inline
    # The same with a wait (sleep, I/O, a lock) is the function blocking the loop.
    timing.ran_inline(0.008, 0.0001, waited=True, name="f")
    assert not timing.inline
    # It must then be quick four times as often in a row to return; one slow call restarts the count.
    for _ in range(15):
        timing.ran_in_thread(0.0001)
    timing.ran_in_thread(0.002)
    for _ in range(15):
        timing.ran_in_thread(0.0001)
    assert not timing.inline
    timing.ran_in_thread(0.0001)
    assert timing.inline


def test_a_function_busy_on_the_cpu_goes_back_to_threads() -> None:
    timing = _Timing(needed=1)
    timing.ran_in_thread(0.0001)
    timing.ran_inline(0.006, 0.006, waited=False, name="f")
    assert not timing.inline
    # Creeping up: every call 2 ms of CPU, none over the 5 ms bound.
    timing = _Timing(needed=1)
    timing.ran_in_thread(0.0001)
    calls = 0
    while timing.inline and calls < 100:
        timing.ran_inline(0.002, 0.002, waited=False, name="f")
        calls += 1
    assert not timing.inline and calls < 20
