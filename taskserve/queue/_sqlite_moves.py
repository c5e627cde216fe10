"""SQLite's side of the state machine: a ``Move`` (``lifecycle.py``) as one guarded UPDATE.

Each shape of move (which guards, which fields) is one statement, built once and cached; the
statement's WHERE holds the guards, so a move that finds the task changed by someone else
updates nothing. The status event is appended by the ``tasks_changed`` trigger, with the
move's ``reason``, in the same transaction.
"""

from __future__ import annotations

import collections
import functools
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._types import TaskStatus
from ._sqlite_schema import count_finished
from .lifecycle import Move

# One failed attempt, appended to the record's errors in the UPDATE that records it.
ADD_ERROR = (
    "errors = json_insert(coalesce(errors, '[]'), '$[#]',"
    " json_object('attempt', attempts, 'type', ?, 'message', ?, 'at', ?))"
)


@dataclass
class Moved:
    """What a batch of moves did, for the announcements made once it is committed."""

    applied: list[bool] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)  # tasks now terminal: wake their waiters
    requeued: bool = False  # tasks back to pending: wake the workers
    stop: list[str] = field(default_factory=list)  # tasks taken from a live holder: tell it


def _shape(move: Move) -> tuple[Any, ...]:
    return (
        move.to,
        move.held,
        move.token is not None,
        move.lapsed,
        move.attempts_left,
        move.delay is not None,
        move.give_back_attempt,
        move.error is not None,
        move.result is not None or move.to is TaskStatus.SUCCESS,
        move.started_at is not None,
        move.batch_size is not None,
    )


@functools.lru_cache(maxsize=64)
def _statement(shape: tuple[Any, ...]) -> str:
    to, held, fenced, lapsed, attempts_left, delayed, give_back, error, result, started, batch = shape
    sets = ["status = ?", "token = NULL", "lease_expires = NULL"]
    if to is TaskStatus.PENDING:
        sets += ["worker = NULL", "reason = ?"]
        if delayed:
            sets.append("run_at = ?")
        if give_back:
            sets += ["attempts = attempts - 1", "started_at = NULL"]
    else:
        sets += ["completed_at = ?", "purge_at = ?"]
    if result:
        sets += ["result = ?", "content_type = ?", "error = NULL"]
    if error:
        sets += ["error = ?", ADD_ERROR]
    if started:
        sets.append("started_at = ?")
    if batch:
        sets.append("batch_size = ?")
    where = ["id = ?", f"status IN ({', '.join(repr(s.value) for s in held)})"]
    if fenced:
        where.append("token = ?")
    if lapsed:
        where.append("lease_expires < ?")
    if attempts_left:
        where.append("attempts < max_attempts")
    return f"UPDATE tasks SET {', '.join(sets)} WHERE {' AND '.join(where)} RETURNING route"


def _params(move: Move, task_id: str, ts: float, purge_at: float) -> list[Any]:
    params: list[Any] = [move.to.value]
    if move.to is TaskStatus.PENDING:
        params.append(move.reason)
        if move.delay is not None:
            params.append(ts + move.delay)
    else:
        params += [ts, purge_at]
    if move.result is not None or move.to is TaskStatus.SUCCESS:
        params += [move.result, move.content_type]
    if move.error is not None:
        params += [move.error_text, *move.error, ts]
    if move.started_at is not None:
        params.append(move.started_at)
    if move.batch_size is not None:
        params.append(move.batch_size)
    params.append(task_id)
    if move.token is not None:
        params.append(move.token)
    if move.lapsed:
        params.append(ts)
    return params


def move_rows(
    conn: sqlite3.Connection, items: Sequence[tuple[str, Sequence[Move]]], ts: float, purge_at: float
) -> Moved:
    """Apply, per task, the first of its moves whose guards hold, in the caller's transaction."""
    out = Moved()
    ended: collections.Counter[tuple[str, str]] = collections.Counter()
    for task_id, moves in items:
        applied = False
        for move in moves:
            row = conn.execute(_statement(_shape(move)), _params(move, task_id, ts, purge_at)).fetchone()
            if row is None:
                continue
            applied = True
            if move.terminal:
                out.ended.append(task_id)
                ended[(row[0], move.to.value)] += 1
            else:
                out.requeued = True
            if move.tells_holder:
                out.stop.append(task_id)
            break
        out.applied.append(applied)
    count_finished(conn, ended)
    return out


def lapsed_ids(conn: sqlite3.Connection, ts: float, limit: int = 1000) -> list[str]:
    """Tasks whose lease ran out: candidates for ``lifecycle.lost``."""
    rows = conn.execute(
        "SELECT id FROM tasks INDEXED BY tasks_leases WHERE status = 'in_progress' AND lease_expires < ? LIMIT ?",
        (ts, limit),
    ).fetchall()
    return [r[0] for r in rows]
