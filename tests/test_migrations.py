"""Stores written by an earlier version open, upgrade in place and keep working.

The SQLite store is built as version 2 wrote it (migrations 1-2, its columns, its rows in
every state); the Redis task hashes as they were before the full record (no new fields).
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskserve._types import Outcome, TaskStatus
from taskserve.queue import Queue
from taskserve.queue._sqlite_schema import MIGRATIONS

from .conftest import REDIS_URL, clear_redis, need_redis

pytestmark = pytest.mark.anyio


def test_migration_numbers_only_increase() -> None:
    numbers = [number for number, _ in MIGRATIONS]
    assert numbers == sorted(set(numbers)) and numbers[0] == 1


def old_id(n: int) -> str:
    return f"{int(time.time() * 1000) - 10_000 + n:012x}{uuid.uuid4().hex[:20]}"


def build_version_2_store(path: Path) -> dict[str, str]:
    """A store exactly as the version before migration 3 left it; returns {state: task id}."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    for number, sql in MIGRATIONS[:2]:
        for statement in sql.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number}")
    now = time.time()
    ids = {state: old_id(n) for n, state in enumerate(["pending", "delayed", "running", "success", "failure", "gone"])}
    ids["cancelled"] = old_id(7)
    columns = "id, route, status, priority, run_at, created_at, started_at, completed_at, expires_at, attempts,"
    columns += " max_attempts, timeout, token, lease_expires, worker, error, content_type, args, result"
    rows = [
        (ids["pending"], "/gen", "pending", 1, now - 5, now - 5, None, None, None, 0, 2, 30.0, None, None, None,
         None, None, b'{"n": 1}', None),
        (ids["delayed"], "/gen", "pending", 0, now + 3600, now - 4, None, None, None, 0, 1, None, None, None, None,
         None, None, b'{"n": 2}', None),
        (ids["running"], "/gen", "in_progress", 0, now - 3, now - 3, now - 2, None, None, 1, 2, None, "tok",
         now - 1, "host:1", None, None, b'{"n": 3}', None),
        (ids["success"], "/gen", "success", 0, now - 3, now - 3, now - 2, now - 1, now + 3600, 1, 1, None, None,
         None, "host:1", None, "application/json", b'{"n": 4}', b"42"),
        (ids["failure"], "/other", "failure", 0, now - 3, now - 3, now - 2, now - 1, now + 3600, 1, 1, None, None,
         None, "host:1", "ValueError: boom", None, b'{"n": 5}', None),
        (ids["gone"], "/gen", "success", 0, now - 9, now - 9, now - 8, now - 7, now - 1, 1, 1, None, None, None,
         "host:1", None, "application/json", b'{"n": 6}', b"1"),
        (ids["cancelled"], "/gen", "cancelled", 0, now - 3, now - 3, None, now - 1, now + 3600, 0, 1, None, None,
         None, None, None, None, b'{"n": 7}', None),
    ]  # fmt: skip
    conn.executemany(f"INSERT INTO tasks ({columns}) VALUES ({', '.join('?' * 19)})", rows)
    conn.execute("INSERT INTO finished (route, status, n) VALUES ('/gen', 'success', 2)")
    conn.close()
    return ids


@pytest.fixture
async def upgraded(tmp_path: Path) -> AsyncIterator[tuple[Queue, dict[str, str]]]:
    ids = build_version_2_store(tmp_path / "old.db")
    queue = Queue.from_url(f"sqlite:///{tmp_path}/old.db")
    await queue.connect()
    yield queue, ids
    await queue.close()


async def test_an_old_sqlite_store_reads_back_after_the_upgrade(upgraded: tuple[Queue, dict[str, str]]) -> None:
    queue, ids = upgraded
    pending = await queue.get(ids["pending"])
    assert (pending.status, pending.priority, pending.max_attempts, pending.timeout) == ("pending", 1, 2, 30.0)
    assert (pending.errors, pending.tags, pending.retry_of, pending.expires_at, pending.purge_at) == (
        [], {}, None, None, None
    )  # fmt: skip
    failure = await queue.get(ids["failure"])
    assert (failure.status, failure.error, failure.route) == (TaskStatus.FAILURE, "ValueError: boom", "/other")
    assert failure.purge_at is not None and failure.purge_at > time.time(), "the old expires_at is the purge time"
    assert failure.expires_at is None and failure.to_json()["run_time"] is not None
    result = await queue.get_result(ids["success"])
    assert result is not None and result.body == b"42"
    assert (await queue.get(ids["cancelled"])).status is TaskStatus.CANCELLED
    # A task stored before the event log has the log its row tells: submitted, run, ended.
    expected = [{"status": "pending"}, {"status": "in_progress"}, {"status": "success"}]
    assert [e.data for e in await queue.events(ids["success"])] == expected
    assert await queue.finished_counts() == {("/gen", "success"): 2}


async def test_an_old_sqlite_store_keeps_working_after_the_upgrade(upgraded: tuple[Queue, dict[str, str]]) -> None:
    queue, ids = upgraded
    [claim] = await queue.claim(["/gen"], "w")
    assert (claim.id, claim.args, claim.attempts) == (ids["pending"], b'{"n": 1}', 1)
    assert await queue.finish([Outcome(claim.id, claim.token, TaskStatus.SUCCESS, b"1", "x")]) == [True]
    # The submit is event 1, read from the task row, for old tasks as for new ones.
    assert [e.data["status"] for e in await queue.events(claim.id)] == ["pending", "in_progress", "success"]
    assert [e.id for e in await queue.events(claim.id, after="0000000001")] == ["0000000002", "0000000003"]
    assert await queue.recover() == 1  # the old running task's lease has lapsed
    running = await queue.get(ids["running"])
    assert (running.status, [e["type"] for e in running.errors]) == (TaskStatus.PENDING, ["WorkerLost"])
    assert await queue.purge() == 1
    listed = [r.id for r in (await queue.list(route="/gen"))[0]]
    assert listed == sorted(set(ids.values()) - {ids["failure"], ids["gone"]}, reverse=True)
    assert await queue.counts() == {("/gen", "pending"): 2}


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    need_redis()
    prefix = f"taskserve-migrate-{uuid.uuid4().hex}"
    yield prefix
    clear_redis(prefix)


@pytest.mark.redis
async def test_an_old_redis_task_hash_reads_back_and_runs(redis_prefix: str) -> None:
    import redis.asyncio as aioredis

    from taskserve.queue.redis import RedisQueue

    raw = aioredis.Redis.from_url(REDIS_URL)
    task_id, now = old_id(0), time.time()
    fields: dict[Any, Any] = {"route": "/gen", "status": "pending", "priority": 0, "run_at": f"{now:.6f}"}
    fields.update({"created_at": f"{now:.6f}", "attempts": 0, "max_attempts": 1, "args": b"{}", "enqueued_by": "r"})
    await raw.hset(f"{redis_prefix}:t:{task_id}", mapping=fields)
    await raw.zadd(f"{redis_prefix}:ready:/gen", {f"{now:017.6f}|{task_id}": 0})
    await raw.sadd(f"{redis_prefix}:routes", "/gen")
    await raw.aclose()
    queue = RedisQueue(REDIS_URL, prefix=redis_prefix)
    try:
        stored = await queue.get(task_id)
        assert (stored.status, stored.errors, stored.tags, stored.expires_at) == ("pending", [], {}, None)
        assert [e.data for e in await queue.events(task_id)] == [{"status": "pending"}]
        [claim] = await queue.claim(["/gen"], "w")
        assert await queue.finish([Outcome(claim.id, claim.token, TaskStatus.FAILURE, error="ValueError: x")])
        done = await queue.get(task_id)
        assert (done.status, [e["type"] for e in done.errors]) == (TaskStatus.FAILURE, ["ValueError"])
        # Numbered as for a new task: 1 is the submit, which the old version did not log.
        statuses = [(e.id, e.data["status"]) for e in await queue.events(task_id)]
        assert statuses == [("0000000001", "pending"), ("0000000002", "in_progress"), ("0000000003", "failure")]
    finally:
        await queue.close()
