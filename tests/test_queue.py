"""The contract every queue backend keeps, run against SQLite and Redis alike.

Each test opens queue instances on one shared store, as the API server and the workers in
separate processes would, and checks behaviour a user relies on.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from taskserve._splice import STORE_CHUNK, SpooledArgs
from taskserve._types import WORKER_LOST, Claim, NewTask, Outcome, TaskStatus, WorkerInfo
from taskserve.exceptions import InvalidTransition, QueueError, QueueFull, QueueUnavailable, TaskNotFound
from taskserve.queue import Queue, lifecycle
from taskserve.queue.lifecycle import Move
from taskserve.queue.sqlite import SQLiteQueue

from .conftest import REDIS_URL, RedisServer, clear_redis, need_redis

pytestmark = pytest.mark.anyio

OpenQueue = Callable[..., Queue]


def with_prefix(url: str, prefix: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own, whose keys are deleted afterwards."""
    need_redis()
    prefix = f"taskserve-test-{uuid.uuid4().hex}"
    yield prefix
    clear_redis(prefix)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def open_queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenQueue]:
    """Opens queue instances on one store: a SQLite file, or a Redis key prefix of this test's own."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/tasks.db"
    else:
        url = with_prefix(REDIS_URL, request.getfixturevalue("redis_prefix"))
    opened: list[Queue] = []

    def open_(**options: Any) -> Queue:
        opened.append(Queue.from_url(url, **options))
        return opened[-1]

    yield open_
    for queue in opened:
        await queue.close()


@pytest.fixture
def queue(open_queue: OpenQueue) -> Queue:
    return open_queue()


def task(route: str = "/gen", args: bytes | SpooledArgs = b'{"prompt": "a"}', **options: Any) -> NewTask:
    return NewTask(route=route, args=args, **options)


def done(claim: Claim, result: bytes = b"42", **options: Any) -> Outcome:
    return Outcome(claim.id, claim.token, TaskStatus.SUCCESS, result, "application/json", **options)


def failed(claim: Claim, **options: Any) -> Outcome:
    return Outcome(claim.id, claim.token, TaskStatus.FAILURE, error="ValueError: boom", **options)


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Call ``check`` (sync or async) until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        await anyio.sleep(0.02)


async def test_enqueue_then_get_is_pending(queue: Queue) -> None:
    record = await queue.enqueue(task(max_attempts=3, priority=2))
    stored = await queue.get(record.id, "/gen")
    assert stored.status is TaskStatus.PENDING
    assert (stored.attempts, stored.max_attempts, stored.priority) == (0, 3, 2)
    assert stored.started_at is None and stored.completed_at is None
    assert await queue.get_result(record.id) is None


async def test_enqueue_many_is_all_or_none(queue: Queue) -> None:
    existing = await queue.enqueue(task())
    batch = [task(), task(), task(id=existing.id)]
    with pytest.raises(QueueError):
        await queue.enqueue_many(batch)
    for new in batch[:2]:
        with pytest.raises(TaskNotFound):
            await queue.get(new.id)
    assert await queue.counts() == {("/gen", "pending"): 1}


async def test_concurrent_claimers_each_get_a_task_exactly_once(open_queue: OpenQueue) -> None:
    ids = [r.id for r in await open_queue().enqueue_many([task() for _ in range(200)])]
    claimed: list[str] = []

    async def claim_loop(queue: Queue, worker: str) -> None:
        while claims := await queue.claim(["/gen"], worker, limit=3):
            claimed.extend(c.id for c in claims)

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(claim_loop, open_queue(), f"worker-{n}")
    assert sorted(claimed) == sorted(ids)


async def test_claim_serves_only_the_given_routes_highest_priority_first(queue: Queue) -> None:
    low = await queue.enqueue(task(priority=0))
    high = await queue.enqueue(task(priority=5))
    other = await queue.enqueue(task("/other", priority=9))
    assert [c.id for c in await queue.claim(["/gen"], "w")] == [high.id]
    assert [c.id for c in await queue.claim(["/gen"], "w")] == [low.id]
    assert await queue.claim(["/gen"], "w") == []
    assert [c.id for c in await queue.claim(["/gen", "/other"], "w")] == [other.id]


async def test_claim_waits_for_run_at(queue: Queue) -> None:
    later = await queue.enqueue(task(run_at=time.time() + 0.3, priority=9))
    now = await queue.enqueue(task())
    assert [c.id for c in await queue.claim(["/gen"], "w")] == [now.id]
    assert await queue.claim(["/gen"], "w") == []
    claims = await eventually(lambda: queue.claim(["/gen"], "w"))
    assert [c.id for c in claims] == [later.id]
    assert (await queue.get(later.id)).status is TaskStatus.IN_PROGRESS


async def test_claim_with_limit_takes_several(queue: Queue) -> None:
    await queue.enqueue_many([task() for _ in range(5)])
    first = await queue.claim(["/gen"], "w", limit=3)
    second = await queue.claim(["/gen"], "w", limit=3)
    assert (len(first), len(second)) == (3, 2)
    assert len({c.id for c in first + second}) == 5
    assert await queue.counts() == {("/gen", "in_progress"): 5}


async def test_finish_and_claim_records_outcomes_and_hands_out_more(queue: Queue) -> None:
    first = await queue.enqueue(task())
    [claim] = await queue.claim(["/gen"], "w")
    stale = failed(claim)
    stale.token = "stale"  # an outcome whose claim no longer holds is still dropped
    assert await queue.finish_and_claim([stale], ["/gen"], "w", limit=5) == []
    assert (await queue.get(first.id)).status is TaskStatus.IN_PROGRESS
    second = await queue.enqueue(task())
    more = await queue.finish_and_claim([done(claim)], ["/gen"], "w", limit=5)
    assert [c.id for c in more] == [second.id]
    assert (await queue.get(first.id)).status is TaskStatus.SUCCESS
    assert await queue.finish_and_claim([done(more[0])], ["/gen"], "w", limit=5) == []
    assert (await queue.get(second.id)).status is TaskStatus.SUCCESS


async def test_finish_success_stores_the_result(queue: Queue) -> None:
    record = await queue.enqueue(task())
    [claim] = await queue.claim(["/gen"], "w")
    assert claim.args == b'{"prompt": "a"}' and claim.attempts == 1
    assert await queue.finish([done(claim, b"\x89PNG")]) == [True]
    stored = await queue.get(record.id)
    assert stored.status is TaskStatus.SUCCESS and stored.completed_at is not None
    result = await queue.get_result(record.id)
    assert result is not None and (result.body, result.content_type) == (b"\x89PNG", "application/json")


async def test_stale_worker_is_fenced_out_after_recovery(open_queue: OpenQueue) -> None:
    queue, other = open_queue(), open_queue()
    record = await queue.enqueue(task(max_attempts=2))
    [stale] = await queue.claim(["/gen"], "w1", lease=0.05)
    await eventually(queue.recover)
    [fresh] = await other.claim(["/gen"], "w2")
    assert await queue.extend({stale.id: stale.token}) == set()
    assert await queue.finish([failed(stale)]) == [False]
    assert await other.finish([done(fresh)]) == [True]
    assert await queue.finish([failed(stale)]) == [False]
    assert (await queue.get(record.id)).status is TaskStatus.SUCCESS


async def test_extend_keeps_a_lease_past_its_first_expiry(queue: Queue) -> None:
    await queue.enqueue(task())
    [claim] = await queue.claim(["/gen"], "w", lease=0.2)
    assert await queue.extend({claim.id: claim.token}, lease=30) == {claim.id}
    await anyio.sleep(0.3)
    assert await queue.recover() == 0
    assert await queue.still_held({claim.id: claim.token}) == {claim.id}
    assert await queue.finish([done(claim)]) == [True]


async def test_recover_requeues_then_fails_as_worker_lost(queue: Queue) -> None:
    record = await queue.enqueue(task(max_attempts=2))
    await queue.claim(["/gen"], "w1", lease=0.01)
    await eventually(queue.recover)
    [again] = await queue.claim(["/gen"], "w2", lease=0.01)
    assert again.attempts == 2
    await eventually(queue.recover)
    stored = await queue.get(record.id)
    assert (stored.status, stored.error, stored.attempts) == (TaskStatus.FAILURE, WORKER_LOST, 2)
    assert await queue.finish([done(again)]) == [False]


async def test_abandon_requeues_what_a_dead_worker_held(queue: Queue) -> None:
    record = await queue.enqueue(task(max_attempts=3))
    await queue.enqueue(task("/other"))
    await queue.claim(["/gen"], "dead")
    [survivor] = await queue.claim(["/other"], "alive")
    assert await queue.abandon("dead") == 1
    assert (await queue.get(record.id)).status is TaskStatus.PENDING
    [again] = await queue.claim(["/gen"], "w2")
    assert (again.id, again.attempts) == (record.id, 2)
    assert await queue.still_held({survivor.id: survivor.token}) == {survivor.id}


async def test_release_hands_a_task_back_without_using_an_attempt(queue: Queue) -> None:
    record = await queue.enqueue(task())
    [claim] = await queue.claim(["/gen"], "w")
    assert await queue.finish([Outcome(claim.id, claim.token, TaskStatus.PENDING)]) == [True]
    stored = await queue.get(record.id)
    assert (stored.status, stored.attempts, stored.worker) == (TaskStatus.PENDING, 0, None)
    [again] = await queue.claim(["/gen"], "w")
    assert (again.id, again.attempts) == (record.id, 1)


async def test_failure_with_retry_requeues_while_attempts_remain(queue: Queue) -> None:
    record = await queue.enqueue(task(max_attempts=2))
    [first] = await queue.claim(["/gen"], "w")
    assert await queue.finish([failed(first, retry=True, retry_delay=0.2)]) == [True]
    assert (await queue.get(record.id)).status is TaskStatus.PENDING
    assert await queue.claim(["/gen"], "w") == []
    [second] = await eventually(lambda: queue.claim(["/gen"], "w"))
    assert await queue.finish([failed(second, retry=True)]) == [True]
    stored = await queue.get(record.id)
    assert (stored.status, stored.error, stored.attempts) == (TaskStatus.FAILURE, "ValueError: boom", 2)


async def test_cancel_pending_task_is_never_claimed(queue: Queue) -> None:
    record = await queue.enqueue(task())
    cancelled = await queue.cancel(record.id, "/gen")
    assert cancelled.status is TaskStatus.CANCELLED and cancelled.completed_at is not None
    assert await queue.claim(["/gen"], "w") == []
    assert (await queue.get(record.id)).status is TaskStatus.CANCELLED
    assert await queue.counts() == {}


async def test_cancel_running_task_reaches_its_worker(open_queue: OpenQueue) -> None:
    api, worker = open_queue(), open_queue()
    heard: list[str] = []
    worker.cancel_listeners.append(heard.append)
    worker.listen_for_cancel()
    await worker.connect()
    record = await api.enqueue(task())
    [claim] = await worker.claim(["/gen"], "w")
    await api.cancel(record.id)
    assert await eventually(lambda: heard) == [record.id]
    assert await worker.still_held({claim.id: claim.token}) == set()
    assert await worker.finish([done(claim)]) == [False]
    assert (await api.get(record.id)).status is TaskStatus.CANCELLED


@pytest.mark.parametrize("outcome", [done, failed])
async def test_cancel_finished_task_is_refused(queue: Queue, outcome: Callable[[Claim], Outcome]) -> None:
    record = await queue.enqueue(task())
    [claim] = await queue.claim(["/gen"], "w")
    await queue.finish([outcome(claim)])
    with pytest.raises(InvalidTransition):
        await queue.cancel(record.id)
    assert (await queue.get(record.id)).status in {TaskStatus.SUCCESS, TaskStatus.FAILURE}


async def test_retry_submits_a_new_task_with_the_same_arguments(queue: Queue) -> None:
    record = await queue.enqueue(task(max_attempts=2, priority=3))
    [claim] = await queue.claim(["/gen"], "w")
    await queue.finish([failed(claim)])
    new = await queue.retry(record.id, "/gen")
    assert new.id != record.id and (new.status, new.max_attempts, new.priority) == (TaskStatus.PENDING, 2, 3)
    [again] = await queue.claim(["/gen"], "w")
    assert (again.id, again.args) == (new.id, claim.args)
    assert (await queue.get(record.id)).status is TaskStatus.FAILURE


async def test_retry_of_an_unfinished_task_is_refused(queue: Queue) -> None:
    record = await queue.enqueue(task())
    with pytest.raises(InvalidTransition):
        await queue.retry(record.id)
    await queue.claim(["/gen"], "w")
    with pytest.raises(InvalidTransition):
        await queue.retry(record.id)
    assert await queue.counts() == {("/gen", "in_progress"): 1}


async def test_get_of_another_route_or_unknown_id_is_not_found(queue: Queue) -> None:
    record = await queue.enqueue(task())
    with pytest.raises(TaskNotFound):
        await queue.get(record.id, "/other")
    with pytest.raises(TaskNotFound):
        await queue.get("no-such-task")
    with pytest.raises(TaskNotFound):
        await queue.cancel(record.id, "/other")
    assert (await queue.get(record.id, "/gen")).status is TaskStatus.PENDING


async def test_wait_returns_once_another_instance_finishes(open_queue: OpenQueue) -> None:
    api, worker = open_queue(), open_queue()
    record = await api.enqueue(task())
    [claim] = await worker.claim(["/gen"], "w")

    async def finish_soon() -> None:
        await anyio.sleep(0.3)
        await worker.finish([done(claim)])

    async with anyio.create_task_group() as tg:
        tg.start_soon(finish_soon)
        started = time.monotonic()
        waited = await api.wait(record.id, timeout=20)
    assert waited.status is TaskStatus.SUCCESS
    assert time.monotonic() - started < 5


async def test_wait_gives_the_unfinished_record_after_the_timeout(queue: Queue) -> None:
    record = await queue.enqueue(task())
    started = time.monotonic()
    waited = await queue.wait(record.id, timeout=0.3)
    assert waited.status is TaskStatus.PENDING
    assert 0.25 < time.monotonic() - started < 3


async def test_finished_tasks_are_deleted_after_the_retention_time(open_queue: OpenQueue) -> None:
    queue = open_queue(retention=1.0)
    kept, finished = await queue.enqueue_many([task("/keep"), task()])
    [claim] = await queue.claim(["/gen"], "w")
    await queue.finish([done(claim)])

    async def expired() -> bool:
        await queue.purge()  # SQLite deletes here; Redis has expired the keys by itself
        return await queue.get_result(finished.id) is None

    await eventually(expired)
    with pytest.raises(TaskNotFound):
        await queue.get(finished.id)
    assert (await queue.get(kept.id)).status is TaskStatus.PENDING


async def test_counts_active_tasks_by_route_and_state(queue: Queue) -> None:
    await queue.enqueue_many([task(), task(), task(run_at=time.time() + 60), task("/other")])
    [claim] = await queue.claim(["/gen"], "w")
    assert await queue.counts() == {("/gen", "pending"): 2, ("/gen", "in_progress"): 1, ("/other", "pending"): 1}
    await queue.finish([done(claim)])
    assert await queue.counts() == {("/gen", "pending"): 2, ("/other", "pending"): 1}


async def test_wait_for_work_wakes_when_another_instance_enqueues(open_queue: OpenQueue) -> None:
    worker, api = open_queue(), open_queue()
    claimed: list[float] = []

    async def work() -> None:
        while not await worker.claim(["/gen"], "w"):
            await worker.wait_for_work(["/gen"], timeout=20)
        claimed.append(time.monotonic())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(work)
            await anyio.sleep(0.3)  # let the worker settle into its wait
            enqueued = time.monotonic()
            await api.enqueue(task())
    assert claimed[0] - enqueued < 3


async def test_wait_for_work_wakes_when_a_delayed_task_falls_due(open_queue: OpenQueue) -> None:
    queue = open_queue()
    await queue.enqueue(task(run_at=time.time() + 0.3))
    assert await queue.claim(["/gen"], "w") == []
    started = time.monotonic()
    await queue.wait_for_work(["/gen"], timeout=2)
    assert time.monotonic() - started < 1.5
    assert len(await queue.claim(["/gen"], "w")) == 1


@pytest.mark.redis
async def test_redis_unreachable_raises_queue_unavailable() -> None:
    from taskserve.queue.redis import RedisQueue

    queue = RedisQueue("redis://127.0.0.1:1/0?socket_connect_timeout=0.5")
    started = time.monotonic()
    for call in (queue.ping, lambda: queue.enqueue(task()), lambda: queue.claim(["/gen"], "w"), queue.counts):
        with pytest.raises(QueueUnavailable, match="127.0.0.1:1"):
            await call()
    await queue.close()
    assert time.monotonic() - started < 5


@pytest.mark.redis
async def test_redis_prefixes_keep_services_apart(redis_prefix: str) -> None:
    from taskserve.queue.redis import RedisQueue

    one = RedisQueue(with_prefix(REDIS_URL, redis_prefix))
    two = RedisQueue(REDIS_URL, prefix=f"{redis_prefix}:two")
    record = await one.enqueue(task())
    with pytest.raises(TaskNotFound):
        await two.get(record.id)
    assert await two.claim(["/gen"], "w") == [] and await two.counts() == {}
    assert await one.counts() == {("/gen", "pending"): 1}
    await one.close()
    await two.close()


@pytest.mark.redis
async def test_redis_reconnects_and_listens_again_after_a_restart(redis_server: RedisServer) -> None:
    from taskserve.queue.redis import RedisQueue

    api, worker = RedisQueue(redis_server.url), RedisQueue(redis_server.url)
    heard: list[str] = []
    worker.cancel_listeners.append(heard.append)
    worker.listen_for_cancel()
    await worker.connect()
    redis_server.stop()
    with pytest.raises(QueueUnavailable):
        await api.enqueue(task())
    redis_server.start()
    record = await api.enqueue(task())
    await worker.claim(["/gen"], "w")
    await worker.connect()  # returns once the listener has subscribed again
    await api.cancel(record.id)
    assert await eventually(lambda: heard) == [record.id]
    await api.close()
    await worker.close()


async def test_sqlite_submit_waits_for_a_held_write_lock_and_keeps_each_submit_apart(tmp_path: Path) -> None:
    """Submits commit on the event loop when the lock is free; while another process holds it,
    they go through the writer thread, which waits. Either way a bad submit fails alone."""
    import sqlite3

    queue = Queue.from_url(f"sqlite:///{tmp_path}/q.db")
    await queue.connect()
    try:
        first = await queue.enqueue(NewTask("/r", b"{}"))
        other = sqlite3.connect(tmp_path / "q.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process mid-write

        async with anyio.create_task_group() as tg:
            results: dict[str, Any] = {}

            async def submit(name: str, task: NewTask) -> None:
                try:
                    results[name] = await queue.enqueue(task)
                except QueueError as exc:
                    results[name] = exc

            tg.start_soon(submit, "new", NewTask("/r", b"{}"))
            tg.start_soon(submit, "dup", NewTask("/r", b"{}", id=first.id))
            await anyio.sleep(0.2)
            assert results == {}, "nothing is acknowledged before it is committed"
            other.execute("COMMIT")
        other.close()
        assert isinstance(results["dup"], QueueError)
        assert (await queue.get(results["new"].id)).status is TaskStatus.PENDING

        # Lock free: the same two submits in one loop turn, committed inline together.
        async with anyio.create_task_group() as tg:
            tg.start_soon(submit, "new", NewTask("/r", b"{}"))
            tg.start_soon(submit, "dup", NewTask("/r", b"{}", id=first.id))
        assert isinstance(results["dup"], QueueError)
        assert (await queue.get(results["new"].id)).status is TaskStatus.PENDING
    finally:
        await queue.close()


async def test_claim_with_limit_takes_the_highest_priority_first(queue: Queue) -> None:
    low, high, mid = await queue.enqueue_many([task(priority=0), task(priority=9), task(priority=5)])
    claims = await queue.claim(["/gen"], "w", limit=3)
    assert [(c.id, c.priority) for c in claims] == [(high.id, 9), (mid.id, 5), (low.id, 0)]


async def test_tasks_of_equal_priority_are_claimed_in_submission_order(queue: Queue) -> None:
    # Many land in the same millisecond: their ids still increase, so the queue stays FIFO.
    submitted = [await queue.enqueue(task()) for _ in range(50)]
    submitted += await queue.enqueue_many([task() for _ in range(50)])
    claims = await queue.claim(["/gen"], "w", limit=100)
    assert [c.id for c in claims] == [t.id for t in submitted]


async def test_claim_with_min_priority_takes_only_urgent_work(queue: Queue) -> None:
    low, mid, high = await queue.enqueue_many([task(priority=0), task(priority=5), task("/other", priority=9)])
    urgent = await queue.claim(["/gen", "/other"], "w", limit=5, min_priority=5)
    assert [c.id for c in urgent] == [high.id, mid.id]
    assert await queue.claim(["/gen"], "w", min_priority=1) == []
    assert [c.id for c in await queue.claim(["/gen"], "w", min_priority=-3)] == [low.id]


def worker_info(worker_id: str) -> WorkerInfo:
    return WorkerInfo(id=worker_id, host="h", pid=7, routes=["/gen"], concurrency=2, started_at=1.5, state="ready")


async def worker_ids(queue: Queue) -> list[str]:
    return [w.id for w in await queue.workers()]


async def test_heartbeat_lists_a_worker_until_its_ttl_passes(open_queue: OpenQueue) -> None:
    api, worker = open_queue(), open_queue()
    await worker.heartbeat(worker_info("brief"), ttl=0.3)
    await worker.heartbeat(worker_info("steady"), ttl=30)
    listed = await api.workers()
    assert [w.id for w in listed] == ["brief", "steady"]
    assert listed[1].routes == ["/gen"] and (listed[1].state, listed[1].started_at) == ("ready", 1.5)
    assert abs(listed[1].last_seen - time.time()) < 5, "stamped when the store took the heartbeat"

    async def brief_gone() -> bool:
        return await worker_ids(api) == ["steady"]

    await eventually(brief_gone)
    await api.forget_worker("steady")
    assert await api.workers() == []


async def test_abandon_forgets_the_dead_worker(queue: Queue) -> None:
    await queue.heartbeat(worker_info("dead"), ttl=30)
    await queue.heartbeat(worker_info("alive"), ttl=30)
    await queue.abandon("dead")
    assert await worker_ids(queue) == ["alive"]


async def test_finished_counts_count_every_end_and_survive_the_purge(open_queue: OpenQueue) -> None:
    queue = open_queue(retention=0.5)
    ok, bad, retried, cancelled, lost, other = await queue.enqueue_many(
        [task(), task(), task(max_attempts=2), task(), task(priority=-1), task("/other")]
    )
    await queue.cancel(cancelled.id)
    claims = {c.id: c for c in await queue.claim(["/gen", "/other"], "w", limit=4)}
    assert set(claims) == {ok.id, bad.id, retried.id, other.id}
    outcomes = [done(claims[ok.id]), failed(claims[bad.id]), failed(claims[retried.id], retry=True)]
    assert await queue.finish([*outcomes, Outcome(other.id, claims[other.id].token, TaskStatus.PENDING)]) == [True] * 4
    await queue.claim(["/gen"], "w", limit=2, lease=0.01)  # the retried task and the one whose worker dies
    await eventually(queue.recover)
    expected = {("/gen", "success"): 1, ("/gen", "failure"): 3, ("/gen", "cancelled"): 1}
    assert await queue.finished_counts() == expected

    async def purged() -> bool:
        await queue.purge()
        return await queue.get_result(ok.id) is None

    await eventually(purged)
    assert await queue.finished_counts() == expected


def retried(claim: Claim, **options: Any) -> Outcome:
    return failed(claim, retry=True, **options)


@pytest.mark.parametrize("ends", [done, retried])
async def test_outcome_started_at_is_the_start_status_shows(queue: Queue, ends: Callable[..., Outcome]) -> None:
    record = await queue.enqueue(task(max_attempts=2))
    [claim] = await queue.claim(["/gen"], "w")
    claimed_at = (await queue.get(record.id)).started_at
    await anyio.sleep(0.2)  # the call starts a while after the claim, as it does behind a worker's buffer
    started = time.time()
    assert await queue.finish([ends(claim, started_at=started)]) == [True]
    stored = (await queue.get(record.id)).started_at
    assert claimed_at is not None and stored is not None
    assert abs(stored - started) < 0.05 and stored - claimed_at > 0.15


# -- the full record, the event log and listing (issue 9) ---------------------------------------


async def test_record_keeps_the_options_of_its_submit(queue: Queue) -> None:
    import hashlib

    before = time.time()
    record = await queue.enqueue(task(tags={"team": "a", "run": "7"}, idempotency_key="k1", ttl=60, priority=2))
    stored = await queue.get(record.id)
    assert (stored.tags, stored.idempotency_key) == ({"team": "a", "run": "7"}, "k1")
    assert stored.args_hash == hashlib.sha256(b'{"prompt": "a"}').hexdigest()
    assert stored.run_at is not None and before - 1 < stored.run_at < time.time() + 1
    assert stored.expires_at is not None and abs(stored.expires_at - (stored.run_at + 60)) < 1
    assert (stored.errors, stored.retry_of, stored.progress, stored.batch_size) == ([], None, None, None)
    body = stored.to_json()
    assert (body["route"], body["priority"], body["tags"], body["queue_time"]) == ("/gen", 2, stored.tags, None)
    assert body["expires_at"].endswith("Z") and body["run_at"].endswith("Z")


async def test_record_without_ttl_has_no_expiry_and_a_deadline_is_kept(queue: Queue) -> None:
    deadline = time.time() + 300
    record = await queue.enqueue(task(deadline=deadline))
    stored = await queue.get(record.id)
    assert stored.expires_at is None and stored.to_json()["expires_at"] is None
    assert stored.deadline is not None and abs(stored.deadline - deadline) < 1


async def test_retry_names_its_origin_and_keeps_the_tags(queue: Queue) -> None:
    record = await queue.enqueue(task(tags={"team": "a"}))
    [claim] = await queue.claim(["/gen"], "w")
    await queue.finish([failed(claim)])
    new = await queue.retry(record.id)
    stored = await queue.get(new.id)
    assert (new.retry_of, stored.retry_of, stored.tags) == (record.id, record.id, {"team": "a"})
    assert stored.to_json()["retry_of"] == record.id
    assert (await queue.get(record.id)).retry_of is None


async def test_errors_keep_every_failed_attempt_and_outlive_a_success(queue: Queue) -> None:
    record = await queue.enqueue(task(max_attempts=3))
    [first] = await queue.claim(["/gen"], "w")
    await queue.finish([failed(first, retry=True)])
    [second] = await queue.claim(["/gen"], "w")
    await queue.finish([Outcome(second.id, second.token, TaskStatus.FAILURE, error_type="KeyError", retry=True)])
    [third] = await queue.claim(["/gen"], "w")
    await queue.finish([done(third, batch_size=4)])
    stored = await queue.get(record.id)
    assert (stored.status, stored.error, stored.batch_size) == (TaskStatus.SUCCESS, None, 4)
    errors = [(e["attempt"], e["type"], e["message"]) for e in stored.errors]
    assert errors == [(1, "ValueError", "boom"), (2, "KeyError", "")]
    assert all(abs(e["at"] - time.time()) < 5 for e in stored.errors)
    assert stored.queue_time is not None and stored.run_time is not None and stored.run_time >= 0
    assert stored.to_json()["errors"][0]["at"].endswith("Z")


async def test_a_lost_worker_is_one_of_the_errors(queue: Queue) -> None:
    record = await queue.enqueue(task(max_attempts=2))
    await queue.claim(["/gen"], "w1", lease=0.01)
    await eventually(queue.recover)
    [again] = await queue.claim(["/gen"], "w2")
    await queue.finish([failed(again)])
    stored = await queue.get(record.id)
    assert [(e["attempt"], e["type"]) for e in stored.errors] == [(1, "WorkerLost"), (2, "ValueError")]
    assert stored.error == "ValueError: boom"


async def statuses(queue: Queue, task_id: str, after: str | None = None) -> list[str]:
    return [e.data["status"] for e in await queue.events(task_id, after)]


async def test_events_log_each_status_change_in_order(open_queue: OpenQueue) -> None:
    api, worker = open_queue(), open_queue()
    record = await api.enqueue(task(max_attempts=2))
    [first] = await worker.claim(["/gen"], "w")
    await worker.finish([failed(first, retry=True)])
    [second] = await worker.claim(["/gen"], "w")
    await worker.finish([done(second)])
    events = await api.events(record.id)
    assert [e.data["status"] for e in events] == ["pending", "in_progress", "pending", "in_progress", "success"]
    assert {e.kind for e in events} == {"status"} and events[2].data["reason"] == "retry"
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == 5 and [int(i) for i in ids] == sorted(int(i) for i in ids)
    assert all(abs(e.at - time.time()) < 5 for e in events)
    assert await statuses(api, record.id, after=ids[2]) == ["in_progress", "success"]
    assert await api.events(record.id, after=ids[-1]) == []
    assert [e.id for e in await api.events(record.id)] == ids, "ids are stable"


async def test_events_log_cancel_release_and_worker_lost(queue: Queue) -> None:
    released, lost, cancelled = await queue.enqueue_many([task(), task(max_attempts=2, priority=-1), task()])
    await queue.cancel(cancelled.id)
    [claim] = await queue.claim(["/gen"], "w")
    await queue.finish([Outcome(claim.id, claim.token, TaskStatus.PENDING)])
    await queue.claim(["/gen"], "w", limit=2, lease=0.01)
    await eventually(queue.recover)
    assert await statuses(queue, cancelled.id) == ["pending", "cancelled"]
    assert await statuses(queue, released.id) == ["pending", "in_progress", "pending", "in_progress", "failure"]
    assert (await queue.events(released.id))[2].data == {"status": "pending", "reason": "released"}
    assert [e.data.get("reason") for e in await queue.events(lost.id)] == [None, None, "lost"]
    assert await queue.events("no-such-task") == []


async def list_ids(queue: Queue, **filters: Any) -> list[str]:
    return [r.id for r in (await queue.list(**filters))[0]]


async def test_list_is_newest_first_with_route_and_status_filters(queue: Queue) -> None:
    # Ids are time-ordered (new_task_id); explicit ones keep four submits of one millisecond in order.
    routes = ("/gen", "/other", "/gen", "/gen")
    a, b, c, d = [
        await queue.enqueue(task(route, id=f"{n:012x}{uuid.uuid4().hex[:20]}")) for n, route in enumerate(routes)
    ]
    [claim] = await queue.claim(["/gen"], "w")  # a, the oldest
    await queue.finish([done(claim)])
    await queue.cancel(d.id)
    assert await list_ids(queue) == [d.id, c.id, b.id, a.id]
    assert await list_ids(queue, route="/gen") == [d.id, c.id, a.id]
    assert await list_ids(queue, status="success") == [a.id]
    assert await list_ids(queue, route="/gen", status=TaskStatus.PENDING) == [c.id]
    assert await list_ids(queue, route="/other", status="cancelled") == []
    page, cursor = await queue.list(route="/gen", status="cancelled")
    assert [r.status for r in page] == [TaskStatus.CANCELLED] and cursor is None


async def test_list_pages_neither_skip_nor_repeat_while_tasks_are_submitted(queue: Queue) -> None:
    first = [r.id for r in await queue.enqueue_many([task() for _ in range(23)])]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page, cursor = await queue.list(route="/gen", limit=5, cursor=cursor)
        seen += [r.id for r in page]
        await queue.enqueue(task())  # submitted while paging
        if cursor is None:
            break
    assert seen == sorted(seen, reverse=True) and len(set(seen)) == len(seen)
    assert set(first) <= set(seen)


async def test_list_by_tag_and_status(queue: Queue) -> None:
    teams = ("a", "b", "a")
    tagged = await queue.enqueue_many(
        [task(tags={"team": t}, id=f"{n:012x}{uuid.uuid4().hex[:20]}") for n, t in enumerate(teams)]
    )
    await queue.enqueue_many([task() for _ in range(5)])
    assert await list_ids(queue, tag="team:a") == [tagged[2].id, tagged[0].id]
    page, cursor = await queue.list(tag="team:a", limit=1)
    assert [r.id for r in page] == [tagged[2].id] and cursor is not None
    assert await list_ids(queue, tag="team:a", limit=1, cursor=cursor) == [tagged[0].id]
    assert await list_ids(queue, tag="team:a", status="success") == []


async def test_list_drops_purged_tasks(open_queue: OpenQueue) -> None:
    queue = open_queue(retention=0.5)
    kept, finished = await queue.enqueue_many([task("/keep"), task()])
    [claim] = await queue.claim(["/gen"], "w")
    await queue.finish([done(claim)])

    async def gone() -> bool:
        await queue.purge()
        return await list_ids(queue) == [kept.id]

    await eventually(gone)
    assert await list_ids(queue, route="/gen") == [] and await queue.events(finished.id) == []


@pytest.mark.redis
async def test_redis_purge_sweeps_expired_tasks_out_of_the_listing_indexes(redis_prefix: str) -> None:
    import redis.asyncio as aioredis

    from taskserve.queue.redis import RedisQueue

    queue = RedisQueue(with_prefix(REDIS_URL, redis_prefix), retention=0.2)
    raw = aioredis.Redis.from_url(REDIS_URL)
    kept, gone = await queue.enqueue_many([task("/keep"), task()])
    [claim] = await queue.claim(["/gen"], "w")
    await queue.finish([done(claim)])

    async def swept() -> bool:
        await queue.purge()  # no listing in between: the sweep alone cleans up
        return await raw.zrange(f"{redis_prefix}:all", 0, -1) == [kept.id.encode()]

    await eventually(swept)
    assert await raw.zcard(f"{redis_prefix}:ix:/gen") == 0 and await raw.exists(f"{redis_prefix}:e:{gone.id}") == 0
    assert await raw.smembers(f"{redis_prefix}:ixroutes") == {b"/keep"}
    await raw.aclose()
    await queue.close()


# -- the state machine's one write primitive (lifecycle.Move), on both backends --------------


async def test_a_move_applies_only_where_its_guards_hold_and_the_first_that_holds_wins(queue: Queue) -> None:
    record = await queue.enqueue(task(max_attempts=2))
    [claim] = await queue.claim(["/gen"], "w")
    ts = time.time()
    assert await queue._apply([(record.id, [Move(TaskStatus.SUCCESS, token="another claim")])], ts) == [False]
    assert await queue._apply([(record.id, lifecycle.lost())], ts) == [False], "its lease still holds"
    assert await queue._apply([("no-such-task", lifecycle.cancelled("r"))], ts) == [False]
    assert (await queue.get(record.id)).status is TaskStatus.IN_PROGRESS

    def retry_or_fail(token: str) -> list[Move]:
        failure = Move(TaskStatus.FAILURE, token=token, error=("E", "x"), error_text="E: x")
        return [replace(failure, to=TaskStatus.PENDING, attempts_left=True, reason="retry", delay=0.0), failure]

    # Attempt 1 of 2: the retry holds. Attempt 2: no attempt is left, so the failure does.
    assert await queue._apply([(record.id, retry_or_fail(claim.token))], time.time()) == [True]
    assert (await queue.get(record.id)).status is TaskStatus.PENDING
    [again] = await queue.claim(["/gen"], "w")
    assert await queue._apply([(record.id, retry_or_fail(again.token))], time.time()) == [True]
    ended = await queue.get(record.id)
    assert (ended.status, ended.error, [e["attempt"] for e in ended.errors]) == (TaskStatus.FAILURE, "E: x", [1, 2])
    # Terminal is final: no move applies any more, whatever its guards.
    assert await queue._apply([(record.id, lifecycle.cancelled("r"))], time.time()) == [False]
    assert [e.data["status"] for e in await queue.events(record.id)][-1] == "failure"


async def test_moves_of_many_tasks_apply_each_on_its_own(queue: Queue) -> None:
    records = await queue.enqueue_many([task() for _ in range(3)])
    claims = {c.id: c for c in await queue.claim(["/gen"], "w", limit=3)}
    items = [
        (records[0].id, lifecycle.finished(Outcome(records[0].id, claims[records[0].id].token, TaskStatus.SUCCESS))),
        (records[1].id, lifecycle.finished(Outcome(records[1].id, "stale token", TaskStatus.SUCCESS))),
        (records[2].id, lifecycle.cancelled("r")),
    ]
    assert await queue._apply(items, time.time()) == [True, False, True]
    statuses = [(await queue.get(r.id)).status for r in records]
    assert statuses == [TaskStatus.SUCCESS, TaskStatus.IN_PROGRESS, TaskStatus.CANCELLED]
    assert await queue.finished_counts() == {("/gen", "success"): 1, ("/gen", "cancelled"): 1}


def spooled(data: bytes) -> SpooledArgs:
    """Arguments as the API hands over an upload over a MiB: in a temporary file."""
    args = SpooledArgs()
    for start in range(0, len(data), 1_000_000):
        args.write(data[start : start + 1_000_000])
    return args


async def staged_or_side_rows(queue: Queue) -> int:
    """What the store holds of large arguments apart from their tasks: SQLite's task_args rows, Redis's staged keys."""
    if isinstance(queue, SQLiteQueue):
        return int(await queue._read(lambda c: c.execute("SELECT count(*) FROM task_args").fetchone()[0]))
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        return len([k async for k in client.scan_iter(f"{queue.prefix}:up:*")])  # type: ignore[attr-defined]
    finally:
        await client.aclose()


async def test_large_arguments_are_stored_in_chunks_and_come_back_whole(open_queue: OpenQueue) -> None:
    queue = open_queue(retention=0.5)
    data = b'{"blob": "' + os.urandom(3_000_000).hex().encode() + b'"}'  # several store chunks and a part
    args = spooled(data)
    record = await queue.enqueue(task(args=args, idempotency_key="big"))
    assert args.file.closed  # handed over: the queue closes it, stored or refused
    # The key compares what the arguments are, not how they travelled.
    again = await queue.enqueue(task(args=data, idempotency_key="big"))
    assert again.replayed and again.id == record.id
    assert await queue.original_args(record.id) == data
    [claim] = await queue.claim(["/gen"], "w")
    assert claim.args == data
    await queue.finish([done(claim)])
    copy = await queue.retry(record.id)
    [claim] = await queue.claim(["/gen"], "w")
    assert (claim.id, claim.args) == (copy.id, data)
    await queue.finish([done(claim)])

    async def purged() -> bool:
        await queue.purge()
        return await queue.get_result(copy.id) is None and await staged_or_side_rows(queue) == 0

    await eventually(purged)


async def test_a_refused_large_submit_leaves_nothing_behind(open_queue: OpenQueue) -> None:
    queue = open_queue()
    await queue.enqueue(task(max_queue=1))
    with pytest.raises(QueueFull):
        await queue.enqueue(task(args=spooled(b'{"blob": "' + b"a" * 2_000_000 + b'"}'), max_queue=1))
    assert await staged_or_side_rows(queue) == 0
    [only] = (await queue.list(route="/gen"))[0]
    [claim] = await queue.claim(["/gen"], "w")
    assert claim.id == only.id and claim.args == b'{"prompt": "a"}'


class FailingMidway(SpooledArgs):
    """Large arguments whose file cannot be read past the first chunk stored (a disk error, say)."""

    def chunks(self, size: int = STORE_CHUNK) -> Iterator[bytes]:
        for n, chunk in enumerate(super().chunks(size)):
            if n == 1:
                raise OSError("the temporary file cannot be read")
            yield chunk


async def test_a_large_submit_failing_midway_stores_nothing(queue: Queue) -> None:
    args = FailingMidway()
    args.write(b'{"blob": "' + b"a" * 9_000_000 + b'"}')
    with pytest.raises((OSError, QueueUnavailable)):
        await queue.enqueue(task(args=args))
    assert args.file.closed
    # SQLite: the task row and the chunk written before the failure are rolled back together.
    assert await queue.counts() == {} and await staged_or_side_rows(queue) == 0
    small = await queue.enqueue(task())
    [claim] = await queue.claim(["/gen"], "w")
    assert claim.id == small.id


async def test_a_disk_full_in_a_batch_of_writes_fails_them_all_and_stores_none(tmp_path: Path) -> None:
    """SQLite undoes a whole transaction on a full disk (not just the failing job's savepoint);
    the jobs queued after it in the same batch must not then commit each on its own."""
    queue = SQLiteQueue(f"sqlite:///{tmp_path}/tasks.db", synchronous="full")  # every submit via the writer
    await queue.connect()
    try:
        pages = await queue._write(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        await queue._write(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 500}"))  # 2 MB left
        entered, gate = threading.Event(), threading.Event()
        busy = asyncio.ensure_future(queue._write(lambda c: (entered.set(), gate.wait(10))))
        await eventually(entered.is_set)  # the writer is busy: the submits below queue up as one batch
        big = b'{"blob": "' + b"a" * 9_000_000 + b'"}'
        submits = [asyncio.ensure_future(queue.enqueue(task(args=a))) for a in (b"{}", spooled(big), b"{}")]
        assert queue._writer is not None
        await eventually(lambda: queue._writer._jobs.qsize() == 3)  # type: ignore[union-attr]
        gate.set()
        await busy
        outcomes = await asyncio.gather(*submits, return_exceptions=True)
        assert isinstance(outcomes[1], QueueUnavailable)
        told = {o.id for o in outcomes if not isinstance(o, BaseException)}
        assert {r.id for r in (await queue.list(route="/gen"))[0]} == told  # what each submit was told is so
        assert await staged_or_side_rows(queue) == 0
    finally:
        await queue.close()
