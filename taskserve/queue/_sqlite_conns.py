"""The SQLite queue's connections, where each statement runs on them, and its wake-ups.

Every other part of the SQLite queue (submits, reads, claims and moves) reaches the store
through the helpers here: ``_quick_read`` and ``_quick_write`` on the event loop's thread, and
``_read`` and ``_write`` on the reader and writer threads (``_sqlite_thread``). Kept apart so
that the choice of thread, the lock stamps and the checkpoints are made in one place, and the
modules of the statements hold statements only. Wake-ups between processes (``_wake``) are
sent and heard here too: they share the connections' lifetime.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlparse

from ..exceptions import QueueUnavailable
from . import _sqlite_lockstamps, _wake
from ._sqlite_schema import Guards, SQLiteWatch, db_path, migrate
from ._sqlite_thread import ThreadedConnection, configure
from .base import DEFAULT_RETENTION, Queue, Watch

T = TypeVar("T")

WAL_LIMIT = 16 * 1024 * 1024
BUSY = object()  # _try_quick_write: the write lock was taken


class SQLiteConnections(Queue):
    """The part of ``SQLiteQueue`` that owns its connections; see ``SQLiteQueue`` for the arguments."""

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

    def _done(self, task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            self._waker.send(_wake.API, f"d:{task_id}".encode())

    @abc.abstractmethod
    def _commit_inserts(self) -> None:
        """Commit the submits waiting for this loop turn (``_sqlite_submit``); ``close`` flushes them."""
