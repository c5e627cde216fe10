"""The SQLite queue's schema, its row-level statements and small helpers, apart from the queue's logic."""

from __future__ import annotations

import asyncio
import collections
import sqlite3
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from .._types import TaskRecord, TaskStatus
from .base import Watch

# Numbered migrations; PRAGMA user_version records the last one applied. Only append.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE IF NOT EXISTS tasks (
            id TEXT PRIMARY KEY,
            route TEXT NOT NULL,
            status TEXT NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            run_at REAL NOT NULL,
            created_at REAL NOT NULL,
            started_at REAL,
            completed_at REAL,
            expires_at REAL,
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL DEFAULT 1,
            timeout REAL,
            token TEXT,
            lease_expires REAL,
            worker TEXT,
            error TEXT,
            content_type TEXT,
            args BLOB NOT NULL,
            result BLOB
        );
        CREATE INDEX IF NOT EXISTS tasks_due ON tasks (priority DESC, run_at, route) WHERE status = 'pending';
        CREATE INDEX IF NOT EXISTS tasks_leases ON tasks (lease_expires, route) WHERE status = 'in_progress';
        CREATE INDEX IF NOT EXISTS tasks_expiry ON tasks (expires_at) WHERE expires_at IS NOT NULL;
        CREATE INDEX IF NOT EXISTS tasks_worker ON tasks (worker) WHERE status = 'in_progress';
        """,
    ),
    (
        2,
        """
        CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, info TEXT NOT NULL, expires REAL NOT NULL);
        CREATE TABLE IF NOT EXISTS finished (
            route TEXT NOT NULL, status TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (route, status)
        ) WITHOUT ROWID;
        """,
    ),
]

RECORD_COLUMNS = (
    "id, route, status, created_at, started_at, completed_at, attempts, max_attempts, error, worker, priority, timeout"
)


def record(row: Sequence[Any]) -> TaskRecord:
    return TaskRecord(
        id=row[0],
        route=row[1],
        status=TaskStatus(row[2]),
        created_at=row[3],
        started_at=row[4],
        completed_at=row[5],
        attempts=row[6],
        max_attempts=row[7],
        error=row[8],
        worker=row[9],
        priority=row[10],
        timeout=row[11],
    )


def db_path(url: str) -> str:
    """``sqlite:///rel/path.db`` is relative to the working directory, ``sqlite:////abs`` absolute."""
    parsed = urlparse(url)
    path = (parsed.netloc + parsed.path)[1:] if parsed.path.startswith("/") else parsed.netloc + parsed.path
    if not path or path == ":memory:":
        raise ValueError(f"The SQLite broker needs a file, shared by all processes: got {url!r}.")
    return path


def count_finished(conn: sqlite3.Connection, ended: collections.Counter[tuple[str, str]]) -> None:
    """Add to the per-route tally of ended tasks, in the transaction that ended them."""
    if ended:
        conn.executemany(
            "INSERT INTO finished (route, status, n) VALUES (?, ?, ?)"
            " ON CONFLICT (route, status) DO UPDATE SET n = n + excluded.n",
            [(route, status, n) for (route, status), n in ended.items()],
        )


def insert_rows(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    conn.executemany(
        "INSERT INTO tasks (id, route, status, priority, run_at, created_at, max_attempts, timeout, args)"
        " VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
        rows,
    )


def migrate(conn: sqlite3.Connection) -> None:
    # Runs inside the writer's batch transaction, so two processes starting at once
    # cannot both apply the same migration.
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, sql in MIGRATIONS:
        if number > version:
            for statement in sql.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")


class SQLiteWatch(Watch):
    def __init__(self, waiters: dict[str, set[asyncio.Event]], task_id: str) -> None:
        self._waiters = waiters
        self._task_id = task_id
        self._event = asyncio.Event()
        waiters.setdefault(task_id, set()).add(self._event)

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        self._event.clear()

    def close(self) -> None:
        events = self._waiters.get(self._task_id)
        if events is not None:
            events.discard(self._event)
            if not events:
                del self._waiters[self._task_id]


def pass_on(fut: asyncio.Future[None], done: asyncio.Future[None]) -> None:
    """Settle ``fut`` as ``done`` ended (a submit waiting on the writer's insert)."""
    if fut.done():
        return
    if done.cancelled():
        fut.cancel()
    elif (error := done.exception()) is not None:
        fut.set_exception(error)
    else:
        fut.set_result(None)
