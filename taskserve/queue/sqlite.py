"""The embedded queue: one SQLite file in WAL mode, shared by every process on the machine.

Submits and the worker's short writes are committed on the event loop's thread when the
write lock is free (submits of one loop turn share a commit: 32 concurrent submits cost one,
not 32); point reads run there too. Each process also keeps two connections owned by threads
of their own: a writer, for bulk inserts, a contended lock and the rarer writes, which
commits whatever queued up while it was busy in one transaction, and a reader for scans and
checkpoints. A ``200`` from submit is sent only after the commit returned.

Durability: ``synchronous=NORMAL`` in WAL mode survives any process crash (``kill -9``); add
``?synchronous=full`` to the URL to also survive power loss, at the cost of an fsync per commit.

This module holds the queue class and its worker-facing writes (claims, moves, leases,
reports) and maintenance; the connections, the submit path and the reads are in
``_sqlite_conns``, ``_sqlite_submit`` and ``_sqlite_reads``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from .._aio import wait_event
from .._types import Claim, Outcome, WorkerInfo
from . import _sqlite_webhooks, _wake, lifecycle
from ._sqlite_conns import BUSY
from ._sqlite_moves import Moved, lapsed_ids, move_rows
from ._sqlite_reads import SQLiteReads
from ._sqlite_schema import MIGRATIONS as MIGRATIONS, read_args
from ._sqlite_submit import SQLiteSubmit

# Claim's reads are pinned to the partial index made for them (small, in claim order): an index
# leading with status, as a listing index might, would otherwise win the planner and need a sort.
DUE = "INDEXED BY tasks_due"
# A claim that finds the write lock taken looks again this often, this many times, before it
# waits for the lock in the writer thread.
CLAIM_TRIES = 3
CLAIM_RETRY = 0.0005
# Running tasks of a route that still hold a live lease (a concurrency cap counts these).
RUNNING = (
    "SELECT count(*) FROM tasks INDEXED BY tasks_leases"
    " WHERE status = 'in_progress' AND lease_expires >= ? AND route = ?"
)


def _numbered(first: int, values: list[str]) -> str:
    """``(?5, ?6, ...)``: placeholders numbered from ``first``, for statements that also use ``?1``-``?4``."""
    return "(" + ", ".join(f"?{first + i}" for i in range(len(values))) + ")"


class SQLiteQueue(SQLiteSubmit, SQLiteReads):
    """The default broker: ``sqlite:///tasks.db``. Shared by the processes of one machine.

    Args:
        url: ``sqlite:///path``, with ``?synchronous=full`` to survive power loss too.
        retention: seconds finished tasks are kept.
        synchronous: overrides the URL's synchronous mode.
        busy_timeout: seconds a write waits for the store's write lock before it fails with
            ``QueueUnavailable``; the API server sets it short (``--busy-timeout``), so that a
            process frozen holding the lock costs clients a 503, not a hang.
    """

    async def _wait_for_work(self, routes: list[str], timeout: float) -> None:
        self.listen_for_cancel()
        marks = ",".join("?" * len(routes))
        # The caller's claim found nothing it may take: plan the wake-up from the next delayed
        # task (due ones left pending are past their TTL, or held back by a concurrency cap).
        # Off the loop: with many delayed tasks of several priorities this reads much of the index.
        ts = time.time()
        row = await self._read(
            lambda c: c.execute(
                f"SELECT min(run_at) FROM tasks {DUE} WHERE status = 'pending' AND route IN ({marks}) AND run_at > ?",
                (*routes, ts),
            ).fetchone()
        )
        if row is not None and row[0] is not None:
            timeout = max(0.0, min(timeout, row[0] - time.time() + 0.002))
        await wait_event(self._work, timeout)
        self._work.clear()

    async def _claim(
        self, routes: list[str], worker: str, limit: int, lease: float, ts: float, min_priority: int | None
    ) -> list[Claim]:
        job = self._claim_job(routes, worker, limit, lease, ts, min_priority)
        for _ in range(CLAIM_TRIES):
            if not await self._maybe_due(routes, ts, min_priority):
                return []
            claims = await self._try_quick_write(job)
            if claims is not BUSY:
                return await self._large_args(claims)  # type: ignore[arg-type]
            # Every worker is woken by a submit, and the lock holder is most often a sibling
            # claiming that very task: look again once it is done rather than queue behind it
            # in the writer thread (two thread hops, to find nothing).
            await asyncio.sleep(CLAIM_RETRY)
        return await self._large_args(await self._write(job))

    async def _large_args(self, claims: list[Claim]) -> list[Claim]:
        """Fill in the arguments kept in task_args, read after the claim's write: never under the write lock.

        Only a purge deletes them, once the task ended: a task cancelled and purged in between
        is dropped here, as there is nothing left to run.
        """
        kept = []
        for claim in claims:
            if not claim.args:
                claim.args = await self._read(functools.partial(read_args, task_id=claim.id, stored=b""))
                if not claim.args:
                    continue
            kept.append(claim)
        return kept

    async def _finish_and_claim(
        self, outcomes: list[Outcome], routes: list[str], worker: str, limit: int, lease: float, ts: float
    ) -> list[Claim]:
        finish, after = self._finish_job(outcomes, ts)
        if not await self._maybe_due(routes, ts):
            await self._quick_write(finish)
            after()
            return []
        claim = self._claim_job(routes, worker, limit, lease, ts)
        _, claims = await self._quick_write(lambda c: (finish(c), claim(c)))
        after()
        return await self._large_args(claims)

    async def _maybe_due(self, routes: list[str], ts: float, min_priority: int | None = None) -> bool:
        """A cheap read first, so that an idle worker's poll never takes the write lock."""
        if min_priority is None:
            hinted, self._work_hint = self._work_hint, False
            if hinted:
                return True
        marks = ",".join("?" * len(routes))
        floor = "" if min_priority is None else f" AND priority >= {int(min_priority)}"
        probe = (
            f"SELECT 1 FROM tasks {DUE} WHERE status = 'pending' AND run_at <= ? AND route IN ({marks}){floor} LIMIT 1"
        )
        return await self._quick_read(lambda c: c.execute(probe, (ts, *routes)).fetchone()) is not None

    def _claim_job(
        self, routes: list[str], worker: str, limit: int, lease: float, ts: float, min_priority: int | None = None
    ) -> Callable[[sqlite3.Connection], list[Claim]]:
        token = os.urandom(8).hex()
        floor = "" if min_priority is None else f" AND priority >= {int(min_priority)}"
        # Past its TTL (never started) or deadline a task is not started: the expiry sweep ends it.
        live = " AND (expires_at IS NULL OR expires_at > ?2 OR attempts > 0) AND (deadline IS NULL OR deadline > ?2)"
        capped = [r for r in routes if r in self.caps]
        claimed = (
            "UPDATE tasks SET status = 'in_progress', attempts = attempts + 1, token = ?1, lease_expires = ?3,"
            " started_at = ?2, worker = ?4 WHERE rowid IN ({pick})"
            " RETURNING id, route, args, attempts, max_attempts, timeout, priority, run_at, deadline, trace"
        )

        def claim(conn: sqlite3.Connection) -> list[Claim]:
            head: tuple[Any, ...] = (token, ts, ts + lease, worker)
            if not capped:
                pick = (
                    f"SELECT rowid FROM tasks {DUE} WHERE status = 'pending' AND run_at <= ?2"
                    f" AND route IN {_numbered(5, routes)}{floor}{live}"
                    f" ORDER BY priority DESC, run_at LIMIT {int(limit)}"
                )
                rows = conn.execute(claimed.format(pick=pick), (*head, *routes)).fetchall()
            else:
                # Each route's slice in claim order, a capped one no deeper than its free slots,
                # counted in this write transaction (so two workers cannot both take the last
                # slot; a lapsed lease frees its slot: its holder is dead or hung, and fenced off).
                parts, params = [], list(head)
                for r in routes:
                    room = limit
                    if r in self.caps:
                        room = min(limit, self.caps[r] - conn.execute(RUNNING, (ts, r)).fetchone()[0])
                    if room <= 0:
                        continue
                    params.append(r)
                    parts.append(
                        f"SELECT * FROM (SELECT rowid AS r, priority, run_at FROM tasks INDEXED BY tasks_queue"
                        f" WHERE route = ?{len(params)} AND status = 'pending' AND run_at <= ?2{floor}{live}"
                        f" ORDER BY priority DESC, run_at LIMIT {int(room)})"
                    )
                if not parts:
                    return []
                pick = f"SELECT r FROM ({' UNION ALL '.join(parts)}) ORDER BY priority DESC, run_at LIMIT {int(limit)}"
                rows = conn.execute(claimed.format(pick=pick), params).fetchall()
            # RETURNING comes in table order, not the sub-select's: put the most urgent first.
            rows.sort(key=lambda r: (-r[6], r[7], r[0]))
            # Large arguments (an empty args) are read after the write: see _large_args.
            return [Claim(r[0], r[1], bytes(r[2]), token, r[3], r[4], r[5], r[6], r[8], r[7], r[9]) for r in rows]

        return claim

    def _finish_job(
        self, outcomes: list[Outcome], ts: float
    ) -> tuple[Callable[[sqlite3.Connection], list[bool]], Callable[[], None]]:
        """The finishing writes, and what to announce once they are committed."""
        return self._move_job([(o.id, lifecycle.finished(o)) for o in outcomes], ts)

    def _move_job(
        self, items: list[tuple[str, list[lifecycle.Move]]], ts: float
    ) -> tuple[Callable[[sqlite3.Connection], list[bool]], Callable[[], None]]:
        """Moves as one write, and the wake-ups to send once it is committed."""
        purge_at = ts + self.retention
        moved = Moved()

        def write(conn: sqlite3.Connection) -> list[bool]:
            nonlocal moved
            moved = move_rows(conn, items, ts, purge_at)
            return moved.applied

        def after() -> None:
            for task_id in moved.stop:
                self._waker.send(_wake.WORKER, f"c:{task_id}".encode())
            self._done(moved.ended)
            if moved.requeued:
                self._waker.send(_wake.WORKER, b"w")

        return write, after

    async def _apply(self, items: list[tuple[str, list[lifecycle.Move]]], ts: float) -> list[bool]:
        write, after = self._move_job(items, ts)
        applied = await self._quick_write(write)
        after()
        return applied

    async def _extend(self, held: dict[str, str], lease: float, ts: float) -> set[str]:
        items = list(held.items())

        def extend(conn: sqlite3.Connection) -> set[str]:
            kept = set()
            for task_id, token in items:
                cur = conn.execute(
                    "UPDATE tasks SET lease_expires = ? WHERE id = ? AND token = ? AND status = 'in_progress'",
                    (ts + lease, task_id, token),
                )
                if cur.rowcount == 1:
                    kept.add(task_id)
            return kept

        return await self._quick_write(extend)

    async def _still_held(self, held: dict[str, str]) -> set[str]:
        ids = list(held)
        marks = ",".join("?" * len(ids))
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT id, token FROM tasks WHERE id IN ({marks}) AND +status = 'in_progress'", ids
            ).fetchall()
        )
        return {task_id for task_id, token in rows if held.get(task_id) == token}

    async def _lapsed(self, ts: float, worker: str | None) -> list[str]:
        if worker is not None:

            def abandon(conn: sqlite3.Connection) -> None:
                conn.execute(
                    "UPDATE tasks INDEXED BY tasks_worker SET lease_expires = ?"
                    " WHERE status = 'in_progress' AND worker = ?",
                    (ts - 1, worker),
                )
                conn.execute("DELETE FROM workers WHERE id = ?", (worker,))

            await self._write(abandon)
        # A read: recovery runs every second in every process, and mostly finds nothing.
        return await self._quick_read(lambda c: lapsed_ids(c, ts))

    async def _report(
        self,
        task_id: str,
        token: str,
        progress: str | None,
        preview: tuple[bytes, str] | None,
        outputs: list[tuple[int, bytes]],
        ts: float,
    ) -> bool:
        image, image_type = preview if preview is not None else (None, None)

        def report(conn: sqlite3.Connection) -> bool:
            held = conn.execute(
                "UPDATE tasks SET progress = coalesce(?, progress), preview = coalesce(?, preview),"
                " preview_type = coalesce(?, preview_type) WHERE id = ? AND token = ? AND status = 'in_progress'",
                (progress, image, image_type, task_id, token),
            ).rowcount
            if held and outputs:
                conn.executemany(
                    "INSERT OR REPLACE INTO outputs (task_id, seq, data, at) VALUES (?, ?, ?, ?)",
                    [(task_id, seq, data.decode(), ts) for seq, data in outputs],
                )
            return bool(held)

        return await self._quick_write(report)

    async def _overdue(self, ts: float) -> list[tuple[str, str, float]]:
        def overdue(conn: sqlite3.Connection) -> list[tuple[str, str, float]]:
            late = conn.execute(
                "SELECT id, 'deadline', deadline FROM tasks INDEXED BY tasks_deadline"
                " WHERE deadline IS NOT NULL AND status IN ('pending', 'in_progress') AND deadline <= ? LIMIT 1000",
                (ts,),
            ).fetchall()
            stale = conn.execute(
                "SELECT id, 'ttl', expires_at FROM tasks INDEXED BY tasks_ttl"
                " WHERE status = 'pending' AND attempts = 0 AND expires_at IS NOT NULL AND expires_at <= ? LIMIT 1000",
                (ts,),
            ).fetchall()
            seen = {r[0] for r in late}
            return late + [r for r in stale if r[0] not in seen]

        return await self._quick_read(overdue)

    async def _take_webhooks(self, limit: int, lease: float, tries: int, ts: float) -> list[tuple[str, int]]:
        # A read first: every API server looks twice a second, and mostly finds nothing due.
        if await self._quick_read(lambda c: c.execute(_sqlite_webhooks.PROBE, (ts,)).fetchone()) is None:
            return []
        return await self._quick_write(lambda c: _sqlite_webhooks.take(c, ts, limit, lease, tries))

    async def _webhook_result(
        self, task_id: str, attempt: int, error: str | None, retry_in: float | None, ts: float
    ) -> bool:
        return await self._quick_write(lambda c: _sqlite_webhooks.settle(c, task_id, attempt, error, retry_in, ts))

    async def _heartbeat(self, info: WorkerInfo, ttl: float, ts: float) -> None:
        info.last_seen = ts
        data = info.dumps()
        await self._quick_write(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO workers (id, info, expires) VALUES (?, ?, ?)", (info.id, data, ts + ttl)
            )
        )

    async def _forget_worker(self, worker: str) -> None:
        await self._write(lambda c: c.execute("DELETE FROM workers WHERE id = ?", (worker,)))

    async def _purge(self, ts: float) -> int:
        total = 0
        await self._write(lambda c: c.execute("DELETE FROM workers WHERE expires < ?", (ts - 3600,)))
        while True:

            def purge(conn: sqlite3.Connection) -> int:
                ids = conn.execute(
                    "DELETE FROM tasks WHERE rowid IN"
                    " (SELECT rowid FROM tasks INDEXED BY tasks_purge WHERE purge_at < ? LIMIT 2000)"
                    " RETURNING id",
                    (ts,),
                ).fetchall()
                conn.executemany("DELETE FROM events WHERE task_id = ?", ids)
                conn.executemany("DELETE FROM outputs WHERE task_id = ?", ids)
                return len(ids)

            deleted = await self._write(purge)
            total += deleted
            if deleted < 2000:
                return total
