"""SQLite's side of the state machine: a ``Move`` (``lifecycle.py``) as one guarded UPDATE.

Each shape of move (which guards, which fields) is one statement, built once and cached; the
statement's WHERE holds the guards, so a move that finds the task changed by someone else
updates nothing. The status event is appended by the ``tasks_changed`` trigger, with the
move's ``reason``, in the same transaction.
"""

from __future__ import annotations

import collections
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
ADD_ERROR_TRACEBACK = (
    "errors = json_insert(coalesce(errors, '[]'), '$[#]',"
    " json_object('attempt', attempts, 'type', ?, 'message', ?, 'at', ?, 'traceback', ?))"
)


@dataclass
class Moved:
    """What a batch of moves did, for the announcements made once it is committed."""

    applied: list[bool] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)  # tasks now terminal: wake their waiters
    requeued: bool = False  # tasks back to pending: wake the workers
    stop: list[str] = field(default_factory=list)  # tasks taken from a live holder: tell it


PENDING, SUCCESS = TaskStatus.PENDING, TaskStatus.SUCCESS
VALUE = {status: status.value for status in TaskStatus}  # an enum's .value costs a descriptor call
_statements: dict[tuple[Any, ...], str] = {}


def _compile(move: Move, task_id: str, ts: float, purge_at: float) -> tuple[str, list[Any]]:
    """The move's statement (one per shape, built once) and its parameters, in one pass."""
    to = move.to
    params: list[Any] = [VALUE[to]]
    delayed = move.delay is not None
    if to is PENDING:
        params.append(move.reason)
        if delayed:
            params.append(ts + move.delay)  # type: ignore[operator]
    else:
        params += (ts, purge_at)
    result = move.result is not None or to is SUCCESS
    if result:
        params += (move.result, move.content_type)
    error = move.error
    if error is not None:
        params += (move.error_text, error[0], error[1], ts)
        if move.traceback is not None:
            params.append(move.traceback)
    started, batch = move.started_at is not None, move.batch_size is not None
    if started:
        params.append(move.started_at)
    if batch:
        params.append(move.batch_size)
    params.append(task_id)
    fenced = move.token is not None
    if fenced:
        params.append(move.token)
    if move.lapsed:
        params.append(ts)
    # error: 0 none, 1 an error, 2 an error with its traceback.
    shape = (to, move.held, fenced, move.lapsed, move.attempts_left, delayed, move.give_back_attempt,
             0 if error is None else 1 + (move.traceback is not None), result, started, batch)  # fmt: skip
    sql = _statements.get(shape)
    if sql is None:
        sql = _statements[shape] = _statement(*shape)
    return sql, params


def _statement(
    to: TaskStatus,
    held: tuple[TaskStatus, ...],
    fenced: bool,
    lapsed: bool,
    attempts_left: bool,
    delayed: bool,
    give_back: bool,
    error: int,
    result: bool,
    started: bool,
    batch: bool,
) -> str:
    sets = ["status = ?", "token = NULL", "lease_expires = NULL"]
    if to is PENDING:
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
        sets += ["error = ?", ADD_ERROR_TRACEBACK if error == 2 else ADD_ERROR]
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


def move_rows(
    conn: sqlite3.Connection, items: Sequence[tuple[str, Sequence[Move]]], ts: float, purge_at: float
) -> Moved:
    """Apply, per task, the first of its moves whose guards hold, in the caller's transaction."""
    out = Moved()
    ended: collections.Counter[tuple[str, str]] = collections.Counter()
    execute = conn.execute
    for task_id, moves in items:
        applied = False
        for move in moves:
            row = execute(*_compile(move, task_id, ts, purge_at)).fetchone()
            if row is None:
                continue
            applied = True
            if move.to is PENDING:
                out.requeued = True
            else:
                out.ended.append(task_id)
                ended[(row[0], VALUE[move.to])] += 1
            if move.token is None and move.tells_holder:
                out.stop.append(task_id)
            break
        out.applied.append(applied)
    if ended:
        count_finished(conn, ended)
    return out


def lapsed_ids(conn: sqlite3.Connection, ts: float, limit: int = 1000) -> list[str]:
    """Tasks whose lease ran out: candidates for ``lifecycle.lost``."""
    rows = conn.execute(
        "SELECT id FROM tasks INDEXED BY tasks_leases WHERE status = 'in_progress' AND lease_expires < ? LIMIT ?",
        (ts, limit),
    ).fetchall()
    return [r[0] for r in rows]
