"""The embedded queue: one SQLite file in WAL mode, shared by every process on the machine.

Submits and the worker's short writes are committed on the event loop's thread when the
write lock is free (submits of one loop turn share a commit: 32 concurrent submits cost one,
not 32); point reads run there too. Each process also keeps two connections owned by threads
of their own: a writer, for bulk inserts, a contended lock and the rarer writes, which
commits whatever queued up while it was busy in one transaction, and a reader for scans and
checkpoints. A ``200`` from submit is sent only after the commit returned.

Durability: ``synchronous=NORMAL`` in WAL mode survives any process crash (``kill -9``); add
``?synchronous=full`` to the URL to also survive power loss, at the cost of an fsync per commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlparse

from .._aio import wait_event
from .._types import Claim, Event, NewTask, Outcome, Result, TaskRecord, WorkerInfo
from ..exceptions import QueueUnavailable
from . import _sqlite_lockstamps, _sqlite_webhooks, _wake, lifecycle
from ._sqlite_moves import Moved, lapsed_ids, move_rows
from ._sqlite_schema import (
    MIGRATIONS as MIGRATIONS,
    RECORD_COLUMNS,
    Guards,
    SQLiteWatch,
    db_path,
    insert_rows,
    list_rows,
    migrate,
    pass_on,
    read_args,
    read_events,
    record,
    spooled,
    task_row,
)
from ._sqlite_thread import ThreadedConnection, configure, translate
from .base import DEFAULT_RETENTION, WAIT_LEVELS, Queue, Watch, now

T = TypeVar("T")

WAL_LIMIT = 16 * 1024 * 1024
# Submits of up to this many tasks are committed on the event loop's thread (see
# _commit_inserts); a bigger bulk insert would hold the loop too long and uses the writer.
INLINE_ROWS = 64
# Claim's reads are pinned to the partial index made for them (small, in claim order): an index
# leading with status, as a listing index might, would otherwise win the planner and need a sort.
DUE = "INDEXED BY tasks_due"
# A claim that finds the write lock taken looks again this often, this many times, before it
# waits for the lock in the writer thread.
CLAIM_TRIES = 3
CLAIM_RETRY = 0.0005
BUSY = object()  # _try_quick_write: the write lock was taken
# A pending task's position is counted up to this many tasks ahead (the status says so beyond).
POSITION_CAP = 10_000
# Running tasks of a route that still hold a live lease (a concurrency cap counts these).
RUNNING = (
    "SELECT count(*) FROM tasks INDEXED BY tasks_leases"
    " WHERE status = 'in_progress' AND lease_expires >= ? AND route = ?"
)


def _numbered(first: int, values: list[str]) -> str:
    """``(?5, ?6, ...)``: placeholders numbered from ``first``, for statements that also use ``?1``-``?4``."""
    return "(" + ", ".join(f"?{first + i}" for i in range(len(values))) + ")"


class SQLiteQueue(Queue):
    """The default broker: ``sqlite:///tasks.db``. Shared by the processes of one machine.

    Args:
        url: ``sqlite:///path``, with ``?synchronous=full`` to survive power loss too.
        retention: seconds finished tasks are kept.
        synchronous: overrides the URL's synchronous mode.
        busy_timeout: seconds a write waits for the store's write lock before it fails with
            ``QueueUnavailable``; the API server sets it short (``--busy-timeout``), so that a
            process frozen holding the lock costs clients a 503, not a hang.
    """

    def __init__(
        self,
        url: str,
        *,
        retention: float = DEFAULT_RETENTION,
        synchronous: str | None = None,
        busy_timeout: float = 10.0,
    ) -> None:
        super().__init__(url, retention=retention)
        self.busy_timeout = busy_timeout
        # Where this process (a worker) tells its supervisor when it holds the write lock.
        self._stamp_inline, self._stamp_writer = _sqlite_lockstamps.from_env()
        self.path = db_path(url)
        query = {k: v[-1] for k, v in parse_qs(urlparse(url).query).items()}
        sync = (synchronous or query.get("synchronous", "normal")).upper()
        if sync not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"Unknown SQLite synchronous mode {sync!r}: use normal or full.")
        self.synchronous = sync
        self.poll_cap = 1.0
        self._writer: ThreadedConnection | None = None
        self._reader: ThreadedConnection | None = None
        self._inline: sqlite3.Connection | None = None
        self._inserts: list[tuple[list[tuple[Any, ...]], Guards | None, bool, asyncio.Future[dict[int, str]]]] = []
        self._checkpointer: asyncio.Task[None] | None = None
        self._waker = _wake.Waker(self.path)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._work = asyncio.Event()
        self._work_hint = False  # told of new work: a claim may skip its probe read

    def describe(self) -> str:
        return f"sqlite:///{os.path.abspath(self.path)}"

    def local_dirs(self) -> list[tuple[str, str]]:
        return [(os.path.dirname(os.path.abspath(self.path)), "the SQLite store's directory")]

    async def connect(self) -> None:
        if self._writer is not None:
            return
        self._writer = ThreadedConnection(
            self.path,
            self.synchronous,
            batch_writes=True,
            name="taskserve-sqlite-writer",
            patience=self.busy_timeout,
            stamp=self._stamp_writer,
        )
        await self._writer.call(migrate)
        self._reader = ThreadedConnection(
            self.path, self.synchronous, batch_writes=False, name="taskserve-sqlite-reader", patience=self.busy_timeout
        )
        self._checkpointer = asyncio.create_task(self._checkpoints())

    async def _checkpoints(self) -> None:
        """Copy the WAL back into the database file every second, off the hot path.

        SQLite's automatic checkpoint runs inside whichever commit crosses the threshold and
        fsyncs there, turning one submit or claim in a few hundred into a multi-millisecond
        one. Here the reader thread does it instead, without blocking writers (PASSIVE);
        every process does, so the WAL stays small whoever is running.
        """
        while True:
            await asyncio.sleep(1.0)
            # Under constant load a PASSIVE checkpoint never finds the moment to restart the
            # WAL, so it only grows; past a bound, TRUNCATE waits for that moment (writers
            # pause for the copy, a few ms per MB) and gives the space back.
            try:
                wal = os.path.getsize(f"{self.path}-wal")
            except OSError:
                wal = 0
            sql = "PRAGMA wal_checkpoint(TRUNCATE)" if wal > WAL_LIMIT else "PRAGMA wal_checkpoint(PASSIVE)"

            def checkpoint(conn: sqlite3.Connection, sql: str = sql) -> None:
                conn.execute(sql).fetchone()

            with contextlib.suppress(QueueUnavailable):
                await self._read(checkpoint)

    async def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
            self._checkpointer = None
        if self._inserts:
            self._commit_inserts()
        self._waker.flush()
        self._waker.close()
        for conn in (self._writer, self._reader):
            if conn is not None:
                conn.close()
        if self._inline is not None:
            self._inline.close()
        self._writer = self._reader = None
        self._inline = None

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        return await self._writer.call(fn)

    async def _inline_conn(self) -> sqlite3.Connection:
        if self._inline is None:
            if self._reader is None:
                await self.connect()
            conn = sqlite3.connect(self.path, timeout=0.0, isolation_level=None, check_same_thread=False)
            configure(conn, self.synchronous)
            self._inline = conn
        return self._inline

    async def _quick_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A point read on the event loop's own thread.

        A lookup by key takes tens of microseconds, less than handing it to a thread and
        back; WAL readers do not wait for writers. If SQLite is busy anyway (a checkpoint,
        recovery), the read goes to the reader thread instead of stalling the loop.
        """
        conn = await self._inline_conn()
        try:
            return fn(conn)
        except sqlite3.OperationalError:
            return await self._read(fn)

    async def _quick_write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A short write on the loop's thread if the write lock is free at once, else via the writer.

        Used for the worker's own writes (claim, finish, lease renewal): they come one at a
        time, so group commit gains nothing, and two thread hops cost more than the write.
        """
        result = await self._try_quick_write(fn)
        if result is BUSY:
            return await self._write(fn)  # someone holds the lock: wait for it off the loop
        return result  # type: ignore[return-value]

    async def _try_quick_write(self, fn: Callable[[sqlite3.Connection], T]) -> T | object:
        """``fn`` in a transaction on the loop's thread, or ``BUSY`` if the write lock is taken."""
        conn = await self._inline_conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return BUSY
        self._stamp_inline.begin()
        try:
            result = fn(conn)
            conn.execute("COMMIT")
            return result
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise QueueUnavailable(f"The SQLite queue at {self.path!r} failed: {exc}.") from exc
            raise
        finally:
            self._stamp_inline.end()

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._reader is None:
            await self.connect()
        assert self._reader is not None
        return await self._reader.call(fn)

    # -- notifications ---------------------------------------------------------------------

    def _on_api_message(self, data: bytes) -> None:
        if data.startswith(b"d:"):
            for event in self._waiters.get(data[2:].decode(), ()):
                event.set()

    def _on_worker_message(self, data: bytes) -> None:
        if data == b"w":
            self._work_hint = True
            self._work.set()
        elif data.startswith(b"c:"):
            self._notify_cancelled(data[2:].decode())

    def _watch(self, task_id: str) -> Watch:
        self._waker.listen(_wake.API, self._on_api_message)
        return SQLiteWatch(self._waiters, task_id)

    def listen_for_cancel(self) -> None:
        self._waker.listen(_wake.WORKER, self._on_worker_message)

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

    def _done(self, task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            self._waker.send(_wake.API, f"d:{task_id}".encode())

    # -- hooks -----------------------------------------------------------------------------

    async def _ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone())

    async def _enqueue(self, tasks: Sequence[NewTask], ts: float) -> dict[int, str]:
        rows = [task_row(t, ts) for t in tasks]
        guards = Guards.of(tasks)
        # Delayed tasks wake nobody: an idle worker sleeps at most a second, then plans its
        # next wake-up from the earliest run_at.
        due = any(t.run_at is None or t.run_at <= ts for t in tasks)
        if self.synchronous in ("FULL", "EXTRA") or len(rows) > INLINE_ROWS or spooled(rows):
            # An fsync per commit, a bulk insert or a large upload: too long to hold the event loop for.
            return await self._insert_via_writer(rows, guards, due)
        await self._inline_conn()
        fut: asyncio.Future[dict[int, str]] = asyncio.get_running_loop().create_future()
        self._inserts.append((rows, guards, due, fut))
        if len(self._inserts) == 1:
            asyncio.get_running_loop().call_soon(self._commit_inserts)
        return await fut

    def _commit_inserts(self) -> None:
        """Commit every submit of this event-loop turn in one transaction, on the loop's thread.

        Group commit without a thread hop: the submits that arrived together share one
        commit, and neither the request nor the worker's wake-up waits for another thread to
        be scheduled (on a busy two-core machine that wait is most of a submit's latency).
        With the write lock taken (a worker's claim), the batch goes to the writer thread.
        A submit refused by its own checks (idempotency conflict, full queue) is rolled back
        alone; the others of the batch commit.
        """
        batch, self._inserts = self._inserts, []
        conn = self._inline
        try:
            if conn is None:
                raise sqlite3.OperationalError("closed")
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            for rows, guards, due, fut in batch:
                asyncio.ensure_future(self._insert_via_writer(rows, guards, due)).add_done_callback(
                    functools.partial(pass_on, fut)
                )
            return
        self._stamp_inline.begin()
        outcomes: list[dict[int, str] | BaseException] = []
        try:
            if len(batch) == 1 and batch[0][1] is None:  # alone and unchecked: its failure rolls back the whole
                outcomes.append(insert_rows(conn, batch[0][0]))
            else:
                for rows, guards, _, _ in batch:
                    conn.execute("SAVEPOINT submit")
                    try:
                        outcomes.append(insert_rows(conn, rows, guards))
                    except Exception as exc:  # this submit's own fault: it alone is refused
                        conn.execute("ROLLBACK TO submit")
                        outcomes.append(translate(exc, self.path) if isinstance(exc, sqlite3.Error) else exc)
                    conn.execute("RELEASE submit")
            conn.execute("COMMIT")
        except BaseException as exc:
            # Whatever went wrong, the transaction ends here and every submit of it gets an answer:
            # an open transaction would hold the write lock, and a future left unresolved a request.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            error = translate(exc, self.path) if isinstance(exc, sqlite3.Error) else exc
            outcomes = [error] * len(batch)
            if not isinstance(exc, Exception):
                for _, _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(QueueUnavailable(f"The submit was interrupted: {exc!r}."))
                raise
        finally:
            self._stamp_inline.end()
        if any(due for (_, _, due, _), out in zip(batch, outcomes, strict=True) if isinstance(out, dict)):
            self._waker.send(_wake.WORKER, b"w")
            self._waker.flush()  # now, not after the responses are written
        for (_, _, _, fut), out in zip(batch, outcomes, strict=True):
            if fut.done():
                continue
            if isinstance(out, dict):
                fut.set_result(out)
            else:
                fut.set_exception(out)

    async def _insert_via_writer(self, rows: list[tuple[Any, ...]], guards: Guards | None, due: bool) -> dict[int, str]:
        replays = await self._write(lambda conn: insert_rows(conn, rows, guards))
        if due:
            self._waker.send(_wake.WORKER, b"w")
        return replays

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

        The claim holds the task from its commit on, so nothing deletes them meanwhile.
        """
        for claim in claims:
            if not claim.args:
                claim.args = await self._read(functools.partial(read_args, task_id=claim.id, stored=b""))
        return claims

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

    async def _take_webhooks(self, limit: int, lease: float, tries: int, ts: float) -> list[tuple[str, int]]:
        # A read first: every API server looks twice a second, and mostly finds nothing due.
        if await self._quick_read(lambda c: c.execute(_sqlite_webhooks.PROBE, (ts,)).fetchone()) is None:
            return []
        return await self._quick_write(lambda c: _sqlite_webhooks.take(c, ts, limit, lease, tries))

    async def _webhook_result(
        self, task_id: str, attempt: int, error: str | None, retry_in: float | None, ts: float
    ) -> bool:
        return await self._quick_write(lambda c: _sqlite_webhooks.settle(c, task_id, attempt, error, retry_in, ts))

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

    async def _heartbeat(self, info: WorkerInfo, ttl: float, ts: float) -> None:
        info.last_seen = ts
        data = info.dumps()
        await self._quick_write(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO workers (id, info, expires) VALUES (?, ?, ?)", (info.id, data, ts + ttl)
            )
        )

    async def _workers(self, ts: float) -> list[WorkerInfo]:
        rows = await self._quick_read(
            lambda c: c.execute("SELECT info FROM workers WHERE expires > ? ORDER BY id", (ts,)).fetchall()
        )
        return [WorkerInfo.loads(r[0]) for r in rows]

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
