"""``GET /{r}/events?task_id=ID``: a task's life as Server-Sent Events, resumable.

Three kinds of event: ``status`` (the status JSON, at each change), ``progress`` (the latest
``taskserve.progress()``, coalesced) and ``output`` (each item a generator task yielded, in
order). The stream ends after the terminal ``status`` event.

Every event's id is the reader's place in the task: ``S.O``, the last status event and the
last output item sent. A client that reconnects with ``Last-Event-ID: S.O`` gets what came
after both, so no output item is lost or repeated; progress is a value, not a log, so a
resumed stream gets the latest one. Everything is read from the store, so any API server
streams any task, and a client that goes away costs one more read at most.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .._types import TaskRecord, TaskStatus, event_id, event_seq, progress_json
from ..exceptions import QueueUnavailable, TaskNotFound
from .auth import owner_filter

if TYPE_CHECKING:
    from .app import EndpointRoutes

EVENT_ID_PATTERN = r"^([0-9]{1,18}(\.[0-9]{1,18})?)?$"  # as /docs.json states it
EVENT_ID = re.compile(EVENT_ID_PATTERN)
KEEP_ALIVE = 15.0  # seconds of silence before a comment line keeps proxies from closing the stream
POLL_RUNNING = 0.1  # seconds between two looks at a running task (progress and output arrive so)
POLL_WAITING = 0.5  # ... at a pending one, whose end a notification announces anyway


def parse_cursor(raw: str | None) -> tuple[int, int]:
    """``S.O`` from a Last-Event-ID; 400 for anything else."""
    if not raw:
        return 0, 0
    if not EVENT_ID.fullmatch(raw):
        s = o = -1
    else:
        status, _, outputs = raw.partition(".")
        s, o = event_seq(status), int(outputs or 0)
    if s < 0 or o < 0:
        raise HTTPException(400, f"Last-Event-ID {raw[:40]!r} is not an id this stream sent; reconnect without it.")
    return s, o


def frame(kind: str, cursor: tuple[int, int], data: Any) -> bytes:
    return f"id: {cursor[0]}.{cursor[1]}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def events(routes: EndpointRoutes, request: Request) -> Response:
    from .app import task_id_param

    task_id = task_id_param(request)
    cursor = parse_cursor(request.headers.get("last-event-id") or request.query_params.get("last_event_id"))
    await routes.queue.get(task_id, routes.route, owner_filter(request))  # 404 now, before the stream starts
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_stream(routes, request, task_id, cursor), media_type="text/event-stream", headers=headers)


async def _stream(
    routes: EndpointRoutes, request: Request, task_id: str, cursor: tuple[int, int]
) -> AsyncIterator[bytes]:
    queue = routes.queue
    status_seq, output_seq = cursor
    progress_at: Any = None
    watch = queue._watch(task_id)  # wakes on the task's end; progress and output are polled
    last_sent = time.monotonic()
    checked = time.monotonic()
    try:
        yield b"retry: 1000\n\n"
        while True:
            try:
                record = await queue.get(task_id)
                news = await queue.events(task_id, event_id(status_seq))
                outputs = await queue.outputs(task_id, output_seq)
            except TaskNotFound:
                return  # purged meanwhile: nothing more will come
            except QueueUnavailable:
                await watch.wait(1.0)
                continue
            chunks: list[bytes] = []
            end: Any = None
            for event in news:
                if TaskStatus(event.data["status"]).is_terminal:
                    end = event
                    continue
                status_seq = event_seq(event.id)
                body = {**record.to_json(), "status": event.data["status"], "at": event.to_json()["at"]}
                if "reason" in event.data:
                    body["reason"] = event.data["reason"]
                chunks.append(frame("status", (status_seq, output_seq), body))
            for seq, data, _ in outputs:
                output_seq = seq
                chunks.append(frame("output", (status_seq, output_seq), json.loads(data)))
            if record.progress is not None and record.progress.get("at") != progress_at:
                progress_at = record.progress.get("at")
                chunks.append(frame("progress", (status_seq, output_seq), progress_json(record.progress)))
            if end is None and not news and record.status.is_terminal:
                end = record  # resumed after the end: say it again, so the stream ends here too
            if end is not None and len(outputs) < 10_000:  # all the output was read after the end
                if not isinstance(end, TaskRecord):
                    status_seq = event_seq(end.id)
                # The record was read before the events: read it again, now that it has ended.
                final = record if record.status.is_terminal else await queue.get(task_id)
                chunks.append(frame("status", (status_seq, output_seq), await routes.status_json(final)))
            if chunks:
                yield b"".join(chunks)
                last_sent = time.monotonic()
                if end is not None and len(outputs) < 10_000:
                    return
                if len(outputs) >= 10_000:
                    continue  # more output waiting: read on at once
            elif time.monotonic() - last_sent > KEEP_ALIVE:
                yield b": keep-alive\n\n"
                last_sent = time.monotonic()
            if time.monotonic() - checked > 1.0:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            await watch.wait(POLL_RUNNING if record.status is TaskStatus.IN_PROGRESS else POLL_WAITING)
    finally:
        watch.close()
