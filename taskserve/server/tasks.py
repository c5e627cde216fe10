"""The operator's view over HTTP: ``GET /tasks`` (every task, filtered and paged) and ``GET /queues``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._types import TaskStatus
from ..exceptions import QueueUnavailable
from ..queue.base import Queue
from ..service import Service
from .auth import owner_filter
from .options import MAX_TAG_VALUE, TAG_KEY
from .workers import WorkerView

logger = logging.getLogger("taskserve.server")

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
WINDOW = 60.0  # seconds "finished in the last minute" looks back
SAMPLE_EVERY = 5.0  # seconds between two samples of the finished tallies
PARAMETERS = ("route", "status", "tag", "limit", "cursor")
CURSOR = re.compile(
    r"[0-9a-f]{32}"
)  # as /docs.json says; a task id (taskserve._types.new_task_id), the last one a page looked at


def _invalid(parameter: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "parameter": parameter}, status_code=422)


async def list_tasks(request: Request) -> Response:
    """Tasks of every route newest first, a page at a time; the cursor is the last id looked at,
    so a page neither repeats nor skips tasks while others are submitted."""
    query = request.query_params
    unknown = sorted(set(query) - set(PARAMETERS))
    if unknown:  # a misspelt filter would otherwise list every task as if it had matched
        return _invalid(unknown[0], f"Unknown parameter {unknown[0]!r}; /tasks takes {', '.join(PARAMETERS)}.")
    status = query.get("status")
    if status is not None and status not in {s.value for s in TaskStatus}:
        states = ", ".join(s.value for s in TaskStatus)
        return _invalid("status", f"status must be one of {states}; got {status!r}.")
    raw_limit = query.get("limit", str(DEFAULT_LIMIT))
    try:
        limit = int(raw_limit)
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError
    except ValueError:
        return _invalid("limit", f"limit must be a whole number from 1 to {MAX_LIMIT}; got {raw_limit!r}.")
    tag = query.get("tag")
    if tag is not None:
        key, sep, value = tag.partition(":")
        if not sep or not TAG_KEY.fullmatch(key) or len(value) > MAX_TAG_VALUE:
            return _invalid(
                "tag",
                f"tag must be KEY:VALUE as in tag=user:42, the key 1-64 letters, digits or _.- and the value "
                f"at most {MAX_TAG_VALUE} characters; got {tag[:80]!r}.",
            )
    route = query.get("route") or None
    if route is not None and not route.startswith("/"):
        route = "/" + route  # an endpoint's name is its default route
    queue: Queue = request.app.state.queue
    cursor = query.get("cursor") or None
    if cursor is not None and not CURSOR.fullmatch(cursor):
        return _invalid("cursor", f"cursor must be a next_cursor from an earlier page of /tasks; got {cursor[:80]!r}.")
    records, cursor = await queue.list(route, status, tag, limit, cursor, owner=owner_filter(request))
    return JSONResponse({"tasks": [r.to_json() for r in records], "next_cursor": cursor})


class Throughput:
    """Tasks finished per route over the last minute, from the store's finished tallies.

    The tallies are counters kept by the store in the write that ends each task (every worker,
    every host), so one cheap read gives all routes; this API process samples them every
    ``SAMPLE_EVERY`` seconds (and at each ``/queues``) and answers the difference with the
    sample about a minute old. Until the process has a minute of samples, the figure covers
    the time since it started sampling, and ``window`` says how long that is.
    """

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.samples: collections.deque[tuple[float, dict[str, int]]] = collections.deque()

    async def sample(self) -> dict[str, int]:
        totals: dict[str, int] = collections.Counter()
        for (route, _), n in (await self.queue.finished_counts()).items():
            totals[route] += n
        ts = time.monotonic()
        if not self.samples or ts - self.samples[-1][0] >= 1.0:
            self.samples.append((ts, dict(totals)))
        # Keep one sample at least WINDOW old, as the base of the difference.
        while len(self.samples) > 1 and ts - self.samples[1][0] >= WINDOW:
            self.samples.popleft()
        return totals

    def last_minute(self, totals: dict[str, int]) -> tuple[dict[str, int], float]:
        since, before = self.samples[0]
        window = min(WINDOW, time.monotonic() - since)
        return {route: n - before.get(route, 0) for route, n in totals.items()}, window

    async def run(self) -> None:
        while True:
            with contextlib.suppress(QueueUnavailable):
                await self.sample()
            await asyncio.sleep(SAMPLE_EVERY)


async def queues(request: Request, service: Service, workers: WorkerView, throughput: Throughput) -> Response:
    """Per route of this service: what waits, what runs, its limits, and how fast it drains."""
    queue: Queue = request.app.state.queue
    routes = [ep for ep in service.endpoints if ep.is_task]
    counts = await queue.counts()
    finished = await queue.finished_counts()
    waits = await queue.longest_waits([ep.route for ep in routes])
    totals = await throughput.sample()
    recent, window = throughput.last_minute(totals)
    live = await workers.live()
    max_queue = request.app.state.max_queue
    body = []
    for ep in routes:
        r = ep.route
        by_status = {s.value: 0 for s in TaskStatus}
        by_status.update({"pending": counts.get((r, "pending"), 0), "in_progress": counts.get((r, "in_progress"), 0)})
        for status in ("success", "failure", "cancelled"):
            by_status[status] = finished.get((r, status), 0)
        body.append(
            {
                "route": r,
                "name": ep.name,
                "counts": by_status,
                "oldest_pending_age": None if r not in waits else round(waits[r], 3),
                "running": by_status["in_progress"],
                "workers": sum(1 for w in live if r in w.routes and w.state != "stopping"),
                "concurrency": ep.concurrency,
                "max_queue": ep.max_queue if ep.max_queue is not None else max_queue,
                "finished_last_minute": recent.get(r, 0),
                "window": round(window, 1),
            }
        )
    return JSONResponse({"queues": body})
