"""Push wake-ups: a task's end reaches whoever waits on it at once, not at the next poll.

``Queue.wait`` polls with back-off as a safety net; the push (SQLite's datagrams between
processes, Redis pub/sub) is what makes it prompt. The HTTP tests allow ``wait`` more time
than a poll takes, so only these tests notice a push that no longer arrives: the waiting
instance polls at most once a minute, and must still return within a second or two.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from taskserve._types import NewTask, Outcome, TaskStatus
from taskserve.queue import Queue

from .conftest import REDIS_URL, clear_redis, need_redis

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

# The waiter's back-off sleeps 0.005 s, doubling: its reads fall at 2.555, 5.115 and 10.235 s.
# Finishing at 5.5 s leaves polling 4.7 s late, a push a few milliseconds.
FINISH_AFTER = 5.5
PROMPT = 2.0


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One store for two queue instances: a SQLite file, or a Redis key prefix of this test's own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/tasks.db"
        return
    need_redis()
    prefix = f"taskserve-test-{uuid.uuid4().hex}"
    yield f"{REDIS_URL}?prefix={prefix}"
    clear_redis(prefix)


async def test_wait_wakes_when_another_instance_finishes_the_task(store_url: str) -> None:
    waiter, worker = Queue.from_url(store_url), Queue.from_url(store_url)
    waiter.poll_cap = 60.0  # polling alone would see the end only after many seconds
    try:
        record = await worker.enqueue(NewTask(route="/gen", args=b"{}"))
        [claim] = await worker.claim(["/gen"], "worker-1")
        ended_at = returned_at = 0.0

        async def finish_later() -> None:
            nonlocal ended_at
            await anyio.sleep(FINISH_AFTER)
            ended_at = time.monotonic()
            assert await worker.finish([Outcome(claim.id, claim.token, TaskStatus.SUCCESS, b"1", "application/json")])

        async with anyio.create_task_group() as tg:
            tg.start_soon(finish_later)
            seen = await waiter.wait(record.id, timeout=30)
            returned_at = time.monotonic()
        assert seen.status is TaskStatus.SUCCESS
        assert returned_at - ended_at < PROMPT, f"wait returned {returned_at - ended_at:.2f}s after the task ended"
    finally:
        await waiter.close()
        await worker.close()
