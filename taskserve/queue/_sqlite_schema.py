"""The SQLite queue's schema, its row-level statements and small helpers, apart from the queue's logic."""

from __future__ import annotations

import asyncio
import collections
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from .._aio import wait_event
from .._splice import SpooledArgs
from .._types import Event, NewTask, TaskRecord, TaskStatus, event_id, unscoped_key
from ..exceptions import IdempotencyConflict, QueueFull
from .base import Watch, queue_full_message

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
    (
        # The full task record (options, errors per attempt, progress, timings) and the event
        # log. The purge time was called expires_at; that name now means the TTL deadline, so the column is renamed
        # (its index follows) and expires_at comes back as a new, empty column. Old rows read
        # back with the new fields empty; their first event is number 1.
        # Only what the task row cannot tell is stored as events: an attempt that went back to
        # pending (its in_progress and the pending with its reason, see lifecycle.history),
        # written by a trigger in the transaction of the move. Claims and ends write no event
        # row: the row holds them (started_at, completed_at), so the hot path pays nothing.
        # Event 1, the submit, is the task row itself (read_events): a submit writes no page more.
        # The listing index holds finished tasks only (they alone have a completed_at), so it takes
        # one write per task, at its end; active tasks are listed through their state's partial index.
        3,
        """
        ALTER TABLE tasks RENAME COLUMN expires_at TO purge_at;
        ALTER TABLE tasks ADD COLUMN expires_at REAL;
        ALTER TABLE tasks ADD COLUMN deadline REAL;
        ALTER TABLE tasks ADD COLUMN errors TEXT;
        ALTER TABLE tasks ADD COLUMN retry_of TEXT;
        ALTER TABLE tasks ADD COLUMN tags TEXT;
        ALTER TABLE tasks ADD COLUMN progress TEXT;
        ALTER TABLE tasks ADD COLUMN idempotency_key TEXT;
        ALTER TABLE tasks ADD COLUMN args_hash TEXT;
        ALTER TABLE tasks ADD COLUMN batch_size INTEGER;
        ALTER TABLE tasks ADD COLUMN reason TEXT;
        CREATE INDEX IF NOT EXISTS tasks_listing ON tasks (status, route, id) WHERE completed_at IS NOT NULL;
        CREATE INDEX IF NOT EXISTS tasks_idempotency ON tasks (route, idempotency_key)
            WHERE idempotency_key IS NOT NULL;
        CREATE TABLE IF NOT EXISTS events (
            task_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL, at REAL NOT NULL,
            PRIMARY KEY (task_id, seq)
        ) WITHOUT ROWID;
        CREATE TRIGGER IF NOT EXISTS tasks_requeued AFTER UPDATE OF status ON tasks
        WHEN new.status = 'pending' AND old.status = 'in_progress' BEGIN
            INSERT INTO events (task_id, seq, kind, data, at) VALUES (
                new.id,
                (SELECT coalesce(max(seq), 1) + 1 FROM events WHERE task_id = new.id),
                'status',
                '{"status":"in_progress"}',
                coalesce(old.started_at, (julianday('now') - 2440587.5) * 86400.0)
            );
            INSERT INTO events (task_id, seq, kind, data, at) VALUES (
                new.id,
                (SELECT coalesce(max(seq), 1) + 1 FROM events WHERE task_id = new.id),
                'status',
                json_object('status', 'pending', 'reason', new.reason),
                (julianday('now') - 2440587.5) * 86400.0
            );
        END;
        """,
    ),
    (
        # Task options (SPEC §7). The TTL and deadline sweeps read partial indexes that hold
        # only the tasks they can still act on; the purge keeps its index on purge_at, under the
        # name it should have had since migration 3 moved tasks_expiry onto that column.
        # tasks_queue is the pending index by route: what a route's queue holds, in claim order,
        # so that a position, a max_queue count and a per-route capped claim read only that
        # route's slice (tasks_due, across routes, serves the plain claim). Idempotency keys
        # become unique per route, so two racing submits with one key can never both insert.
        # The webhook URL waits for §8.
        4,
        """
        DROP INDEX IF EXISTS tasks_expiry;
        CREATE INDEX IF NOT EXISTS tasks_purge ON tasks (purge_at) WHERE purge_at IS NOT NULL;
        CREATE INDEX IF NOT EXISTS tasks_queue ON tasks (route, priority DESC, run_at) WHERE status = 'pending';
        CREATE INDEX IF NOT EXISTS tasks_ttl ON tasks (expires_at)
            WHERE status = 'pending' AND attempts = 0 AND expires_at IS NOT NULL;
        CREATE INDEX IF NOT EXISTS tasks_deadline ON tasks (deadline)
            WHERE deadline IS NOT NULL AND status IN ('pending', 'in_progress');
        DROP INDEX IF EXISTS tasks_idempotency;
        CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency ON tasks (route, idempotency_key)
            WHERE idempotency_key IS NOT NULL;
        ALTER TABLE tasks ADD COLUMN webhook TEXT;
        """,
    ),
    (
        # Webhook deliveries (SPEC §8): the task row is the outbox. A task with a webhook enters
        # the partial index in the very write that ends it (it sets completed_at), so the
        # delivery is due from that commit on, without a write of its own; it leaves once
        # delivered or failed. webhook_due is NULL until the first try (due at once), then the
        # lease of the try under way or the time of the next one.
        5,
        """
        ALTER TABLE tasks ADD COLUMN webhook_state TEXT;
        ALTER TABLE tasks ADD COLUMN webhook_attempts INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE tasks ADD COLUMN webhook_error TEXT;
        ALTER TABLE tasks ADD COLUMN webhook_due REAL;
        CREATE INDEX IF NOT EXISTS tasks_webhooks ON tasks (coalesce(webhook_due, 0))
            WHERE webhook IS NOT NULL AND webhook_state IS NULL AND completed_at IS NOT NULL;
        """,
    ),
    (
        # Progress and streamed output (SPEC §8). The latest preview image lives beside the
        # progress JSON; each item a generator task yields is a row of outputs, numbered from 1
        # within the attempt (a later attempt writes over the same numbers), purged with its task.
        6,
        """
        ALTER TABLE tasks ADD COLUMN preview BLOB;
        ALTER TABLE tasks ADD COLUMN preview_type TEXT;
        CREATE TABLE IF NOT EXISTS outputs (
            task_id TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL, at REAL NOT NULL,
            PRIMARY KEY (task_id, seq)
        ) WITHOUT ROWID;
        """,
    ),
    (
        # Tracing (SPEC §9): the submit's trace context, handed to the worker with the claim.
        7,
        """
        ALTER TABLE tasks ADD COLUMN trace TEXT;
        """,
    ),
    (
        # Access control (SPEC §10): the owner of the API key that submitted the task (NULL on a
        # server without keys). tasks_owner lists one owner's tasks newest first without reading
        # anyone else's; an owner never changes, so the index costs one write per task, at submit.
        # Idempotency keys stay unique per (route, stored key): the stored key carries the owner.
        8,
        """
        ALTER TABLE tasks ADD COLUMN owner TEXT;
        CREATE INDEX IF NOT EXISTS tasks_owner ON tasks (owner, id) WHERE owner IS NOT NULL;
        """,
    ),
    (
        # Large arguments (uploads over a MiB) in a table of their own, a few MiB a row: one
        # INSERT of the whole value would have SQLite build it in memory twice over (and a blob
        # written in pieces into a zeroblob writes every page twice). The task row's args is empty
        # for them (arguments are never empty otherwise: at least "{}"). The trigger deletes them
        # with their task, whichever statement deletes it.
        9,
        """
        CREATE TABLE IF NOT EXISTS task_args (
            task_id TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (task_id, seq)
        );
        CREATE TRIGGER IF NOT EXISTS tasks_args_dropped AFTER DELETE ON tasks WHEN length(old.args) = 0 BEGIN
            DELETE FROM task_args WHERE task_id = old.id;
        END;
        """,
    ),
]

RECORD_COLUMNS = (
    "id, route, status, created_at, started_at, completed_at, attempts, max_attempts, error, worker, priority, timeout,"
    " run_at, errors, retry_of, tags, progress, idempotency_key, args_hash, batch_size, expires_at, deadline, purge_at,"
    " webhook, webhook_state, webhook_attempts, webhook_error, owner"
)
STATUSES = tuple(s.value for s in TaskStatus)


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
        run_at=row[12],
        errors=[] if row[13] is None else json.loads(row[13]),
        retry_of=row[14],
        tags={} if row[15] is None else json.loads(row[15]),
        progress=None if row[16] is None else json.loads(row[16]),
        idempotency_key=unscoped_key(row[17]),
        args_hash=row[18],
        batch_size=row[19],
        expires_at=row[20],
        deadline=row[21],
        purge_at=row[22],
        webhook=row[23],
        webhook_state=row[24],
        webhook_attempts=row[25],
        webhook_error=row[26],
        owner=row[27],
    )


# -- the event log ---------------------------------------------------------------------------


def read_events(conn: sqlite3.Connection, task_id: str) -> list[Event]:
    """The task's stored events (see lifecycle.history for the whole log)."""
    rows = conn.execute("SELECT seq, kind, data, at FROM events WHERE task_id = ? ORDER BY seq", (task_id,)).fetchall()
    return [Event(event_id(seq), kind, json.loads(data), at) for seq, kind, data, at in rows]


# -- listing ---------------------------------------------------------------------------------


def list_rows(
    conn: sqlite3.Connection,
    route: str | None,
    status: str | None,
    limit: int,
    before: str | None,
    owner: str | None = None,
) -> tuple[list[TaskRecord], str | None]:
    """Newest first: through the primary key, the listing index of finished tasks, or for an
    active state its partial index (sorted, so the cost follows the backlog, not the store).

    A route without a status merges the states' slices; a finished state without a route
    merges the slices of each route found in it (a skip-scan of the listing index). One
    owner's tasks are read through tasks_owner.
    """
    upper, bound = ("AND id < ?", [before]) if before else ("", [])
    if owner is not None:
        return _owner_rows(conn, owner, route, status, limit, upper, bound)
    if route is None and status is None:
        sql = f"SELECT {RECORD_COLUMNS} FROM tasks WHERE 1 {upper} ORDER BY id DESC LIMIT ?"
        rows = conn.execute(sql, (*bound, limit + 1)).fetchall()
    else:
        states = (status,) if status is not None else STATUSES
        rows, slices = [], 0
        for state in states:
            # The state is one of STATUSES, written into the SQL so that the partial index applies.
            if state in ACTIVE_INDEX:
                index, where = ACTIVE_INDEX[state], "" if route is None else "AND route = ?"
                routes: list[str | None] = [route]
            else:
                index, where = "tasks_listing", "AND completed_at IS NOT NULL AND route = ?"
                routes = [route] if route is not None else [r for (r,) in conn.execute(ROUTES_IN_STATE, (state,))]
            sql = (
                f"SELECT {RECORD_COLUMNS} FROM tasks INDEXED BY {index} WHERE status = '{TaskStatus(state).value}'"
                f" {where} {upper} ORDER BY id DESC LIMIT ?"
            )
            for r in routes:
                rows += conn.execute(sql, (*([] if r is None else [r]), *bound, limit + 1)).fetchall()
                slices += 1
        if slices > 1:
            rows.sort(key=lambda row: row[0], reverse=True)
    page = [record(r) for r in rows[:limit]]
    return page, (page[-1].id if len(rows) > limit else None)


def _owner_rows(
    conn: sqlite3.Connection,
    owner: str,
    route: str | None,
    status: str | None,
    limit: int,
    upper: str,
    bound: list[str],
) -> tuple[list[TaskRecord], str | None]:
    """One owner's tasks. Unfiltered, a range of tasks_owner; with a route or status, the owner's
    newest ``OWNER_WINDOW`` ids are looked at (the index is by age only) and the cursor goes on
    from the last one looked at, as a tag filter does."""
    if route is None and status is None:
        sql = (
            f"SELECT {RECORD_COLUMNS} FROM tasks INDEXED BY tasks_owner WHERE owner = ? {upper}"
            " ORDER BY owner DESC, id DESC LIMIT ?"
        )
        rows = conn.execute(sql, (owner, *bound, limit + 1)).fetchall()
        page = [record(r) for r in rows[:limit]]
        return page, (page[-1].id if len(rows) > limit else None)
    ids = [
        i
        for (i,) in conn.execute(
            f"SELECT id FROM tasks INDEXED BY tasks_owner WHERE owner = ? {upper} ORDER BY owner DESC, id DESC LIMIT ?",
            (owner, *bound, OWNER_WINDOW + 1),
        )
    ]
    found: list[TaskRecord] = []
    for n, task_id in enumerate(ids[:OWNER_WINDOW]):
        row = conn.execute(f"SELECT {RECORD_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None or (route is not None and row[1] != route) or (status is not None and row[2] != status):
            continue
        found.append(record(row))
        if len(found) == limit:
            return found, (task_id if n + 1 < len(ids) else None)
    return found, (ids[OWNER_WINDOW - 1] if len(ids) > OWNER_WINDOW else None)


OWNER_WINDOW = 5000  # ids of one owner a filtered page looks at
ACTIVE_INDEX = {"pending": "tasks_due", "in_progress": "tasks_leases"}
ROUTES_IN_STATE = """
    WITH RECURSIVE r(route) AS (
        SELECT min(route) FROM tasks INDEXED BY tasks_listing WHERE status = ?1
            AND completed_at IS NOT NULL
        UNION ALL
        SELECT (
            SELECT min(route) FROM tasks INDEXED BY tasks_listing
            WHERE status = ?1 AND completed_at IS NOT NULL AND route > r.route
        )
        FROM r WHERE r.route IS NOT NULL
    )
    SELECT route FROM r WHERE route IS NOT NULL
"""


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


ARGS = 7  # where a task row holds its arguments


def task_row(t: NewTask, ts: float) -> tuple[Any, ...]:
    """The task's row to insert; a ``SpooledArgs`` stays in it for insert_rows to write apart."""
    tags = json.dumps(t.tags) if t.tags else None
    return (t.id, t.route, t.priority, t.run_at, ts, t.max_attempts, t.timeout, t.args, tags, t.retry_of,
            t.stored_key, t.args_hash, t.expires_at, t.deadline, t.webhook, t.trace, t.owner)  # fmt: skip


def spooled(rows: Sequence[tuple[Any, ...]]) -> bool:
    return any(isinstance(row[ARGS], SpooledArgs) for row in rows)


def write_spooled(conn: sqlite3.Connection, task_id: str, args: SpooledArgs) -> None:
    """Store large arguments a chunk a row, so that SQLite never holds more than a chunk of them."""
    for seq, chunk in enumerate(args.chunks()):
        conn.execute("INSERT INTO task_args (task_id, seq, data) VALUES (?, ?, ?)", (task_id, seq, chunk))


def read_args(conn: sqlite3.Connection, task_id: str, stored: bytes) -> bytes:
    """A task's arguments from its row's ``stored`` value, or from task_args where that is empty."""
    if stored:
        return bytes(stored)
    return b"".join(
        row[0] for row in conn.execute("SELECT data FROM task_args WHERE task_id = ? ORDER BY seq", (task_id,))
    )


@dataclass
class Guards:
    """The checks a submit with an idempotency key or a ``max_queue`` makes in its insert's transaction.

    Inside the write transaction nobody else can insert, so "look, then insert" is race-free:
    two submits with one key find each other, and a queue is never filled past its bound.
    Submits without either option carry no Guards and pay nothing.
    """

    routes: list[str]  # the route of each row
    keyed: list[tuple[int, str, str, str, str]]  # (row index, route, key, key as stored (per owner), args hash)
    limits: dict[str, int]  # route -> max_queue

    @classmethod
    def of(cls, tasks: Sequence[NewTask]) -> Guards | None:
        keyed = [
            (i, t.route, t.idempotency_key, t.stored_key or "", t.args_hash or "")
            for i, t in enumerate(tasks)
            if t.idempotency_key
        ]
        limits = {t.route: t.max_queue for t in tasks if t.max_queue is not None}
        if not keyed and not limits:
            return None
        return cls([t.route for t in tasks], keyed, limits)

    def check(self, conn: sqlite3.Connection) -> dict[int, str]:
        """``{row index: id of the earlier task}`` for keys seen before; raises on a conflict or a full queue."""
        replays: dict[int, str] = {}
        for i, route, key, stored, digest in self.keyed:
            row = conn.execute(
                "SELECT id, args_hash FROM tasks WHERE route = ? AND idempotency_key = ?", (route, stored)
            ).fetchone()
            if row is not None:
                if row[1] != digest:
                    raise IdempotencyConflict(key, row[0])
                replays[i] = row[0]
        for route, cap in self.limits.items():
            new = sum(1 for i, r in enumerate(self.routes) if r == route and i not in replays)
            if not new:
                continue
            pending = conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_queue"
                " WHERE status = 'pending' AND route = ? LIMIT ?)",
                (route, cap),
            ).fetchone()[0]
            if pending + new > cap:
                raise QueueFull(queue_full_message(route, pending, cap, new), route=route, excess=pending + new - cap)
        return replays


def insert_rows(conn: sqlite3.Connection, rows: list[tuple[Any, ...]], guards: Guards | None = None) -> dict[int, str]:
    """Insert the tasks, but those whose idempotency key names an earlier task; returns those."""
    replays = guards.check(conn) if guards is not None else {}
    fresh = [row for i, row in enumerate(rows) if i not in replays] if replays else rows
    large = [(row[0], row[ARGS]) for row in fresh if isinstance(row[ARGS], SpooledArgs)]
    if large:
        fresh = [(*row[:ARGS], b"", *row[ARGS + 1 :]) if isinstance(row[ARGS], SpooledArgs) else row for row in fresh]
    conn.executemany(
        "INSERT INTO tasks (id, route, status, priority, run_at, created_at, max_attempts, timeout, args, tags,"
        " retry_of, idempotency_key, args_hash, expires_at, deadline, webhook, trace, owner)"
        " VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        fresh,
    )
    for task_id, args in large:
        write_spooled(conn, task_id, args)
    return replays


def statements(sql: str) -> list[str]:
    """A migration's statements; a trigger's body holds semicolons of its own."""
    out, pending = [], ""
    for part in sql.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                out.append(pending)
            pending = ""
    return out


def migrate(conn: sqlite3.Connection) -> None:
    # Runs inside the writer's batch transaction, so two processes starting at once
    # cannot both apply the same migration.
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, sql in MIGRATIONS:
        if number > version:
            for statement in statements(sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")


class SQLiteWatch(Watch):
    def __init__(self, waiters: dict[str, set[asyncio.Event]], task_id: str) -> None:
        self._waiters = waiters
        self._task_id = task_id
        self._event = asyncio.Event()
        waiters.setdefault(task_id, set()).add(self._event)

    async def wait(self, timeout: float) -> None:
        await wait_event(self._event, timeout)
        self._event.clear()

    def close(self) -> None:
        events = self._waiters.get(self._task_id)
        if events is not None:
            events.discard(self._event)
            if not events:
                del self._waiters[self._task_id]


def pass_on(fut: asyncio.Future[Any], done: asyncio.Future[Any]) -> None:
    """Settle ``fut`` as ``done`` ended (a submit waiting on the writer's insert)."""
    if fut.done():
        return
    if done.cancelled():
        fut.cancel()
    elif (error := done.exception()) is not None:
        fut.set_exception(error)
    else:
        fut.set_result(done.result())
