"""A sqlite3 connection driven by a thread of its own, for the SQLite queue.

sqlite3 calls block, so each connection lives in one thread and takes jobs from a queue;
callers await a future. The writer's thread runs every job that queued up while it was busy
in one transaction (group commit), each job in a savepoint so one failing job fails alone.

A job waits for the write lock at most ``patience`` seconds from when it was queued, then
fails with ``QueueUnavailable`` (the API answers 503): a process that froze holding the lock
must cost callers a prompt error, not a hang (its supervisor ends it, see ``_sqlite_lockstamps``).
"""

from __future__ import annotations

import asyncio
import os
import queue as thread_queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..exceptions import QueueError, QueueUnavailable
from ._sqlite_lockstamps import NO_STAMP, Stamp

T = TypeVar("T")


def configure(conn: sqlite3.Connection, synchronous: str) -> None:
    """Per-connection settings: every connection of the queue needs all of them."""
    conn.execute(f"PRAGMA synchronous={synchronous}")  # FULL unless told otherwise, per connection
    conn.execute("PRAGMA wal_autocheckpoint=0")  # see SQLiteQueue._checkpoints
    # Point reads on a store of millions of tasks: keep the hot B-tree pages in memory and
    # read the file through mmap rather than a syscall per page.
    conn.execute("PRAGMA cache_size=-16384")
    conn.execute("PRAGMA mmap_size=268435456")


def translate(exc: sqlite3.Error, path: str) -> QueueError:
    """The queue's exception for a sqlite3 one: a refused write, or the store failing."""
    if isinstance(exc, sqlite3.IntegrityError):
        return QueueError(f"The SQLite queue refused a write: {exc}.")
    return QueueUnavailable(f"The SQLite queue at {path!r} failed: {exc}.")


class ThreadedConnection:
    """One sqlite3 connection driven by its own thread; jobs return asyncio futures."""

    def __init__(
        self,
        path: str,
        synchronous: str,
        *,
        batch_writes: bool,
        name: str,
        patience: float = 10.0,
        stamp: Stamp = NO_STAMP,
    ) -> None:
        self.path = path
        self.patience = patience
        self.stamp = stamp
        self.synchronous = synchronous
        self.batch_writes = batch_writes
        self._jobs: thread_queue.SimpleQueue[Any] = thread_queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise QueueUnavailable(f"Cannot open the SQLite queue at {path!r}: {self._error}.")

    def _open(self) -> sqlite3.Connection:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        # Tasks and results are nobody else's business: create the file 0600 ourselves
        # (sqlite3 would make it 0644); SQLite gives the WAL and SHM files the db's mode.
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        # The writer waits for the write lock itself (see _begin): SQLite's own busy handler
        # sleeps in steps of 1 ms and more, far longer than our transactions hold the lock.
        timeout = 0.0 if self.batch_writes else self.patience
        conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        configure(conn, self.synchronous)
        return conn

    def _run(self) -> None:
        try:
            conn = self._open()
        except BaseException as exc:  # reported to the opener
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            job = self._jobs.get()
            if job is None:
                break
            batch = [job]
            if self.batch_writes:
                while len(batch) < 256:
                    try:
                        nxt = self._jobs.get_nowait()
                    except thread_queue.Empty:
                        break
                    if nxt is None:
                        self._jobs.put(None)
                        break
                    batch.append(nxt)
                self._run_batch(conn, batch)
            else:
                fn, fut, loop, _ = job
                self._resolve_call(conn, fn, fut, loop)
        conn.close()

    @staticmethod
    def _resolve_call(conn: sqlite3.Connection, fn: Callable[..., Any], fut: Any, loop: Any) -> None:
        try:
            value, error = fn(conn), None
        except BaseException as exc:
            value, error = None, exc
        _settle(loop, fut, value, error)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[Any]) -> None:
        """All jobs in one transaction, each in a savepoint so one failing job fails alone."""
        batch = self._begin(conn, batch)
        if not batch:
            return
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            for fn, _, _, _ in batch:
                conn.execute("SAVEPOINT job")
                try:
                    outcomes.append((fn(conn), None))
                    conn.execute("RELEASE job")
                except BaseException as exc:
                    outcomes.append((None, exc))
                    try:
                        conn.execute("ROLLBACK TO job")
                        conn.execute("RELEASE job")
                    except sqlite3.Error:
                        pass
                    if not conn.in_transaction:
                        # SQLite undid the whole transaction, not just this job (a full disk, an I/O
                        # error): the jobs before it are gone too, and those after it would each
                        # commit on their own (a savepoint outside a transaction is one).
                        outcomes = [(None, exc)] * len(batch)
                        break
            else:
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                    outcomes = [(None, exc)] * len(batch)
        finally:
            self.stamp.end()
        for (_, fut, loop, _), (value, error) in zip(batch, outcomes, strict=True):
            _settle(loop, fut, value, error)

    def _begin(self, conn: sqlite3.Connection, batch: list[Any]) -> list[Any]:
        """Take the write lock for ``batch``; returns the jobs still wanting it (none: nothing to do).

        SQLite's own busy handler sleeps in steps of 1 ms and more, far longer than our
        transactions hold the lock, so we poll. A job that has waited ``patience`` since it was
        queued is answered now, and the others wait on.
        """
        delay = 0.00005
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                self.stamp.begin()
                return batch
            except sqlite3.Error as exc:
                if not isinstance(exc, sqlite3.OperationalError) or (
                    "locked" not in str(exc) and "busy" not in str(exc)
                ):
                    for _, fut, loop, _ in batch:
                        _settle(loop, fut, None, exc)
                    return []
            now = time.monotonic()
            if any(now - queued > self.patience for _, _, _, queued in batch):
                busy = QueueUnavailable(
                    f"The task store is busy: another process has held the write lock of {self.path!r} "
                    f"for over {self.patience:g}s; retry shortly."
                )
                for _, fut, loop, queued in batch:
                    if now - queued > self.patience:
                        _settle(loop, fut, None, busy)
                batch = [job for job in batch if now - job[3] <= self.patience]
                if not batch:
                    return []
            time.sleep(delay)
            delay = min(delay * 2, 0.002)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, fut, loop, time.monotonic()))
        try:
            return await fut
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)


def _settle(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    def apply() -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    try:
        loop.call_soon_threadsafe(apply)
    except RuntimeError:  # the loop closed while the job ran
        pass
