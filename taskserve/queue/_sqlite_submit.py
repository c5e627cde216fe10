"""The SQLite queue's submit path: group commit on the event loop's thread, or the writer for bulk.

Apart from the queue class because it is the one write that batches callers together: the
submits of one loop turn share a transaction, each in a savepoint of its own so that one
refused by its own checks (idempotency conflict, full queue) does not refuse the others, and
every submit gets an answer whatever ends the transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import Sequence
from typing import Any

from .._types import NewTask
from ..exceptions import QueueUnavailable
from . import _wake
from ._sqlite_conns import SQLiteConnections
from ._sqlite_schema import Guards, insert_rows, pass_on, spooled, task_row
from ._sqlite_thread import translate

# Submits of up to this many tasks are committed on the event loop's thread (see
# _commit_inserts); a bigger bulk insert would hold the loop too long and uses the writer.
INLINE_ROWS = 64


class SQLiteSubmit(SQLiteConnections):
    """``_enqueue`` for ``SQLiteQueue``."""

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
