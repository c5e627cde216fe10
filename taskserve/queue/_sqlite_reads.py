"""The SQLite queue's reads: records, events, results, outputs, listings, counts, the worker registry.

Apart from the queue class because none of these takes the write lock: each is a point read
on the loop's thread or a scan on the reader thread, so they can be checked against the
indexes they use without the claim and move statements in between.
"""

from __future__ import annotations

import sqlite3

from .._types import Event, Result, TaskRecord, WorkerInfo
from ._sqlite_conns import SQLiteConnections
from ._sqlite_schema import RECORD_COLUMNS, list_rows, read_args, read_events, record
from .base import WAIT_LEVELS, now

# A pending task's position is counted up to this many tasks ahead (the status says so beyond).
POSITION_CAP = 10_000


class SQLiteReads(SQLiteConnections):
    """The read hooks of ``SQLiteQueue``."""

    async def _ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone())

    async def _get(self, task_id: str) -> TaskRecord | None:
        row = await self._quick_read(
            lambda c: c.execute(f"SELECT {RECORD_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
        )
        return None if row is None else record(row)

    async def _events(self, task_id: str) -> list[Event]:
        return await self._quick_read(lambda c: read_events(c, task_id))

    async def _list(
        self, route: str | None, status: str | None, limit: int, before: str | None, owner: str | None = None
    ) -> tuple[list[TaskRecord], str | None]:
        return await self._read(lambda c: list_rows(c, route, status, limit, before, owner))

    async def _get_args(self, task_id: str) -> bytes | None:
        def get_args(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT args FROM tasks WHERE id = ?", (task_id,)).fetchone()
            return None if row is None else read_args(conn, task_id, row[0])

        return await self._read(get_args)

    async def _get_result(self, task_id: str) -> Result | None:
        row = await self._quick_read(
            lambda c: c.execute(
                "SELECT result, content_type FROM tasks WHERE id = ? AND status = 'success'", (task_id,)
            ).fetchone()
        )
        if row is None or row[0] is None:
            return None
        return Result(bytes(row[0]), row[1])

    async def _outputs(self, task_id: str, after: int) -> list[tuple[int, bytes, float]]:
        rows = await self._quick_read(
            lambda c: c.execute(
                "SELECT seq, data, at FROM outputs WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT 10000",
                (task_id, after),
            ).fetchall()
        )
        return [(seq, data.encode(), at) for seq, data, at in rows]

    async def _preview(self, task_id: str) -> Result | None:
        row = await self._quick_read(
            lambda c: c.execute("SELECT preview, preview_type FROM tasks WHERE id = ?", (task_id,)).fetchone()
        )
        if row is None or row[0] is None:
            return None
        return Result(bytes(row[0]), row[1] or "application/octet-stream")

    async def _position(self, record: TaskRecord, ts: float) -> int:
        # Ahead of it: a higher priority, or the same and an earlier run_at (then id), and due by
        # the time it is. Reads the route's slice of the pending index up to this task.
        # Counted up to POSITION_CAP, on the reader thread: a deep backlog must not stall the loop.
        due, p, run_at = max(ts, record.run_at or ts), record.priority, record.run_at
        row = await self._read(
            lambda c: c.execute(
                "SELECT count(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_queue"
                " WHERE route = ? AND status = 'pending'"
                " AND (priority > ? OR (priority = ? AND (run_at < ? OR (run_at = ? AND id < ?)))) AND run_at <= ?"
                f" LIMIT {POSITION_CAP})",
                (record.route, p, p, run_at, run_at, record.id, due),
            ).fetchone()
        )
        return int(row[0])

    async def _finished_counts(self) -> dict[tuple[str, str], int]:
        rows = await self._read(lambda c: c.execute("SELECT route, status, n FROM finished").fetchall())
        return {(route, status): n for route, status, n in rows}

    async def _longest_waits(self, routes: list[str]) -> dict[str, float]:
        def read(conn: sqlite3.Connection) -> dict[str, float]:
            ts = now()
            out: dict[str, float] = {}
            for route in routes:
                # One index seek per priority level: the first task of each is its longest waiting.
                earliest, below = None, None
                for _ in range(WAIT_LEVELS):
                    floor = "" if below is None else " AND priority < ?"
                    row = conn.execute(
                        "SELECT priority, run_at FROM tasks INDEXED BY tasks_queue"
                        f" WHERE route = ? AND status = 'pending'{floor} ORDER BY priority DESC, run_at LIMIT 1",
                        (route,) if below is None else (route, below),
                    ).fetchone()
                    if row is None:
                        break
                    below, run_at = row
                    if run_at <= ts and (earliest is None or run_at < earliest):
                        earliest = run_at
                if earliest is not None:
                    out[route] = ts - earliest
            return out

        return await self._read(read)

    async def _workers(self, ts: float) -> list[WorkerInfo]:
        rows = await self._quick_read(
            lambda c: c.execute("SELECT info FROM workers WHERE expires > ? ORDER BY id", (ts,)).fetchall()
        )
        return [WorkerInfo.loads(r[0]) for r in rows]

    async def _counts(self) -> dict[tuple[str, str], int]:
        def counts(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
            out: dict[tuple[str, str], int] = {}
            for status in ("pending", "in_progress"):
                for route, n in conn.execute(
                    f"SELECT route, count(*) FROM tasks WHERE status = '{status}' GROUP BY route"
                ):
                    out[(route, status)] = n
            return out

        return await self._read(counts)
