"""``POST /{r}/wait_many``: the statuses (and small JSON results) of many tasks in one long poll.

A client that ran N tasks would otherwise spend N requests waiting and N more fetching: this
answers up to ``MAX_IDS`` tasks per request, once ``min_done`` of them have ended, with each
finished task's JSON result inline while the answer stays under ``INLINE_BUDGET``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pydantic_core
from starlette.requests import Request
from starlette.responses import Response

from .._aio import wait_event
from .._types import Result, TaskRecord, TaskStatus, iso
from ..exceptions import TaskNotFound, ValidationFailed
from ..queue.base import Queue, Watch
from ..queue.sqlite import SQLiteQueue
from .auth import owner_filter
from .inputs import read_json

if TYPE_CHECKING:
    from .app import EndpointRoutes

T = TypeVar("T")

MAX_IDS = 1000  # task ids in one request
MAX_WAIT = 300.0
DEFAULT_WAIT = 30.0
MAX_BODY = 1024 * 1024
INLINE_RESULT = 64 * 1024  # a JSON result up to this size travels inline
INLINE_BUDGET = 8 * 1024 * 1024  # all inline results of one answer together
FIELDS = {"task_ids", "timeout", "min_done", "results", "full_status"}
READ_AHEAD = 16  # concurrent store reads of one request
RESCAN = 1.0  # seconds between full re-reads, the safety net under the per-task wake-ups


def _fail(field: str, message: str, kind: str = "value_error") -> ValidationFailed:
    detail = [{"loc": [field], "msg": message, "type": kind}]
    return ValidationFailed(f"Invalid wait_many request: {field} {message}.", detail)


async def parse_request(request: Request) -> tuple[list[str], float, int, bool, bool]:
    """The ids (deduplicated, in order), timeout, min_done, results and full_status of a request body."""
    data = await read_json(request, dict, MAX_BODY)
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise _fail(unknown[0], f"unknown field; expected {', '.join(sorted(FIELDS))}", "extra_forbidden")
    ids = data.get("task_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise _fail("task_ids", "must be a list of task id strings", "list_type")
    if len(ids) > MAX_IDS:
        raise _fail("task_ids", f"at most {MAX_IDS} ids per request, got {len(ids)}; split them", "too_long")
    timeout = data.get("timeout", DEFAULT_WAIT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < math.inf:
        raise _fail("timeout", "must be a number of seconds, 0 or more", "float_type")
    min_done = data.get("min_done", 1)
    if isinstance(min_done, float) and min_done.is_integer():
        min_done = int(min_done)  # 3.0 is an integer to JSON Schema, as it is to the document
    if isinstance(min_done, bool) or not isinstance(min_done, int) or min_done < 1:
        raise _fail("min_done", "must be a whole number, 1 or more", "int_type")
    flags = {name: data.get(name, name == "results") for name in ("results", "full_status")}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise _fail(name, "must be true or false", "bool_type")
    return list(dict.fromkeys(ids)), min(float(timeout), MAX_WAIT), min_done, flags["results"], flags["full_status"]


class _Watches:
    """One wake-up for a set of tasks: which of them a backend announced as changed."""

    def __init__(self, queue: Queue, ids: list[str]) -> None:
        self.changed: set[str] = set()
        self.event = asyncio.Event()
        self._closed = False
        # _watch is the queue's per-task wake-up (what Queue.wait uses); registered before the
        # first read, so no change between that read and the wait is missed.
        self._watches = [(queue._watch(i), i) for i in ids]
        self._tasks = [asyncio.ensure_future(self._follow(w, i)) for w, i in self._watches]

    async def _follow(self, watch: Watch, task_id: str) -> None:
        # The flag, not only the cancel: asyncio.wait_for may swallow a cancel that races with
        # the wake-up it was waiting for (bpo-42130), and the loop must end all the same.
        while not self._closed:
            await watch.wait(MAX_WAIT)
            self.changed.add(task_id)
            self.event.set()

    def drop(self, task_id: str) -> None:
        self.changed.discard(task_id)

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for watch, _ in self._watches:
            watch.close()
        await asyncio.wait(self._tasks, timeout=1.0)


async def _read(queue: Queue, ids: list[str], route: str, owner: str | None) -> dict[str, TaskRecord | None]:
    """The records of ``ids`` on ``route`` (None: unknown, expired, of another route or another owner).

    At most ``READ_AHEAD`` reads in flight: a broker's connection pool is finite (Redis answers
    "Too many connections" past it), and a few concurrent reads already hide the round trips.
    """

    async def one(task_id: str) -> TaskRecord | None:
        try:
            return await queue.get(task_id, route, owner)
        except TaskNotFound:
            return None

    return dict(zip(ids, await _each(queue, one, ids), strict=True))


async def wait_for(
    queue: Queue, ids: list[str], route: str, timeout: float, min_done: int, owner: str | None = None
) -> tuple[dict[str, TaskRecord], list[str], list[str]]:
    """Wait until ``min_done`` of the tasks (all, if fewer) have ended, or ``timeout`` passes.

    Returns:
        The ended tasks' records by id, the ids still running or queued, and the unknown ids.
    """
    deadline = time.monotonic() + timeout
    done: dict[str, TaskRecord] = {}
    missing: list[str] = []
    open_ids = ids
    to_read = ids
    watches: _Watches | None = None
    last_scan = time.monotonic()
    try:
        while True:
            for task_id, rec in (await _read(queue, to_read, route, owner)).items():
                if rec is None:
                    missing.append(task_id)
                elif rec.status.is_terminal:
                    done[task_id] = rec
            open_ids = [i for i in open_ids if i not in done and i not in missing]
            if not open_ids or missing or len(done) >= min(min_done, len(ids)) or time.monotonic() >= deadline:
                break
            if watches is None:
                # Only now, when there is something to wait for: the watches are registered
                # before this second read, so no change after it goes unannounced.
                watches = _Watches(queue, open_ids)
                to_read, last_scan = open_ids, time.monotonic()
                continue
            remaining = deadline - time.monotonic()
            await wait_event(watches.event, min(remaining, RESCAN))
            watches.event.clear()
            if time.monotonic() - last_scan >= RESCAN:
                to_read, last_scan = open_ids, time.monotonic()
            else:
                to_read = [i for i in open_ids if i in watches.changed]
            for task_id in to_read:
                watches.drop(task_id)
    finally:
        if watches is not None:
            await watches.close()
    return done, open_ids, missing


async def _results(queue: Queue, ids: list[str]) -> dict[str, Result]:
    """The JSON results of ``ids`` that have one; others (files, images, expired) are left out."""
    found: dict[str, Result] = {}
    for task_id, result in zip(ids, await _each(queue, queue.get_result, ids), strict=True):
        if result is not None and result.content_type.split(";")[0].strip() == "application/json":
            found[task_id] = result
    return found


async def _each(queue: Queue, read: Callable[[str], Awaitable[T]], ids: list[str]) -> list[T]:
    """``read`` of every id: one after another where reads never leave the thread (SQLite's point
    reads take microseconds, less than an asyncio task costs), else ``READ_AHEAD`` at a time."""
    if isinstance(queue, SQLiteQueue):
        return [await read(i) for i in ids]
    out: list[T] = []
    for start in range(0, len(ids), READ_AHEAD):
        out += await asyncio.gather(*(read(i) for i in ids[start : start + READ_AHEAD]))
    return out


def _brief(record: TaskRecord) -> dict[str, Any]:
    """What a bulk waiter needs of an ended task; ``full_status`` asks for the whole record."""
    return {
        "task_id": record.id,
        "status": record.status.value,
        "completed_at": iso(record.completed_at),
        "attempts": record.attempts,
        "error": record.error,
    }


async def wait_many(routes: EndpointRoutes, request: Request) -> Response:
    """``POST /{r}/wait_many``: see ``docs/clients.md``; an unknown id answers at once, listed in ``missing``."""
    ids, timeout, min_done, with_results, full = await parse_request(request)
    queue = routes.queue
    done, open_ids, missing = await wait_for(queue, ids, routes.route, timeout, min_done, owner_filter(request))
    ended = [done[i] for i in ids if i in done]
    succeeded = [r.id for r in ended if r.status is TaskStatus.SUCCESS] if with_results else []
    results = await _results(queue, succeeded)
    parts: list[bytes] = []
    budget = INLINE_BUDGET
    for record in ended:
        item = pydantic_core.to_json(record.to_json() if full else _brief(record))
        if record.status is TaskStatus.SUCCESS:
            result = results.get(record.id)
            if result is not None and len(result.body) <= min(INLINE_RESULT, budget):
                budget -= len(result.body)
                # The stored result is JSON already: spliced in, not parsed and encoded again.
                item = item[:-1] + b',"result":' + result.body + b"}"
            else:
                url = pydantic_core.to_json(f"{routes.route}/get?task_id={record.id}")
                item = item[:-1] + b',"result_url":' + url + b"}"
        parts.append(item)
    body = (
        b'{"tasks":['
        + b",".join(parts)
        + b'],"pending":'
        + pydantic_core.to_json(open_ids)
        + b',"missing":'
        + pydantic_core.to_json(missing)
        + b"}"
    )
    return Response(body, media_type="application/json")
