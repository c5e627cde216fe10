"""BentoML's wire format, for BentoML's own ``SyncHTTPClient``/``AsyncHTTPClient`` (1.4).

Two parts. ``routes`` describes the endpoints the way BentoML's ``/schema.json`` does (its
clients build their methods from that list); the schema always carries it beside taskserve's
``endpoints``. ``BentoWire`` is an ASGI middleware that answers a BentoML client in BentoML's
words: status ``completed``/``failed``/``canceled`` and ``executed_at``, 400 for a result not
ready or bad arguments, ``str`` results as ``text/plain``, arrays as nested lists, a
generator's items streamed as they come, and multipart text fields read as the JSON BentoML's
client writes them. Whether a request gets it: ``never``, ``always``, or (``auto``, the
default) when its User-Agent starts with ``BentoML HTTP Client/``; every other request passes
through untouched after that one header check.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

import pydantic_core
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._types import TaskStatus
from ..codec import Codec
from ..exceptions import InvalidTransition, QueueUnavailable
from ..service import Endpoint, Service
from .events import POLL_RUNNING
from .inputs import JSON_FORM_FIELDS

if TYPE_CHECKING:
    from .app import EndpointRoutes

WireMode = Literal["auto", "always", "never"]
USER_AGENT = b"BentoML HTTP Client/"
TASK_ACTIONS = ("submit", "status", "get", "retry", "cancel")
STATUS_WORDS = {
    TaskStatus.PENDING.value: "pending",
    TaskStatus.IN_PROGRESS.value: "in_progress",
    TaskStatus.SUCCESS.value: "completed",
    TaskStatus.FAILURE.value: "failed",
    TaskStatus.CANCELLED.value: "canceled",
}
MAX_REF_DEPTH = 8  # a recursive model is inlined this deep, then left as a $ref
# Set in the scope of a BentoML client's direct call of a generator: its items are streamed.
STREAM_CALL = "taskserve.bentoml_stream"
STREAM_MEDIA_TYPE = "text/event-stream"  # what BentoML's server names a generator's output

# -- /schema.json: BentoML's "routes" ------------------------------------------------------

_FILE = {"type": "file", "format": "binary"}
_IMAGE = {"type": "file", "format": "image", "pil": True}
_TENSOR = {"type": "tensor", "format": "numpy-array"}
_BINARY_OUTPUT: dict[str, dict[str, Any]] = {
    "image": _IMAGE,
    "file": _FILE,
    "bytes": {"type": "string", "format": "binary"},
    "ndarray": _TENSOR,
}


def routes(service: Service) -> list[dict[str, Any]]:
    """Each endpoint as a BentoML route: name, route, input and output schema (files as ``type: file``), is_task."""
    return [
        {
            "name": ep.name,
            "route": ep.route,
            "description": ep.fn.__doc__,
            "batchable": ep.batchable,
            "input": _input(ep.codec),
            "output": _output(ep.codec),
            "is_task": ep.is_task,
        }
        for ep in service.endpoints
    ]


def _input(codec: Codec) -> dict[str, Any]:
    schema = _inline(codec.model.model_json_schema(by_alias=True))
    schema.setdefault("properties", {})
    schema["title"] = "Input"
    for param in codec.params:
        if param.kind in ("image", "file", "bytes"):
            schema["properties"][param.name] = {**(_IMAGE if param.kind == "image" else _FILE), "title": param.name}
        elif param.kind == "ndarray":
            schema["properties"][param.name] = {**_TENSOR, "title": param.name}
    return schema


def _output(codec: Codec) -> dict[str, Any]:
    if codec.streams:  # BentoML describes a generator by its item, marked as a stream
        item = _inline(codec.output_schema).get("items", {})
        return {**item, "is_stream": True, "media_type": STREAM_MEDIA_TYPE}
    if codec.output_kind in _BINARY_OUTPUT:
        return dict(_BINARY_OUTPUT[codec.output_kind])
    return _inline(codec.output_schema)


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with its ``$defs`` written in place: BentoML's client reads properties without resolving refs."""
    defs = schema.get("$defs", {})

    def walk(node: Any, depth: int) -> Any:
        if isinstance(node, list):
            return [walk(item, depth) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/") and depth < MAX_REF_DEPTH:
            target = defs.get(ref.rsplit("/", 1)[1])
            if target is not None:
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return {**walk(copy.deepcopy(target), depth + 1), **walk(rest, depth)}
        return {k: walk(v, depth) for k, v in node.items() if k != "$defs"}

    inlined: dict[str, Any] = walk(schema, 0)
    return inlined


# -- the middleware ------------------------------------------------------------------------


class BentoWire:
    """Answers BentoML's clients in BentoML's words; passes every other request through unchanged."""

    def __init__(self, app: ASGIApp, service: Service, mode: WireMode = "auto") -> None:
        self.app = app
        self.mode = mode
        self.actions: dict[str, tuple[Endpoint, str]] = {}
        for ep in service.endpoints:
            self.actions[ep.route] = (ep, "call")
            if ep.is_task:
                self.actions.update({f"{ep.route}/{action}": (ep, action) for action in TASK_ACTIONS})

    def wants(self, scope: Scope) -> bool:
        if self.mode != "auto":
            return self.mode == "always"
        for key, value in scope["headers"]:
            if key == b"user-agent":
                return bool(value.startswith(USER_AGENT))
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.wants(scope):
            await self.app(scope, receive, send)
            return
        scope[JSON_FORM_FIELDS] = True
        found = self.actions.get(_route_path(scope))
        if found is None:
            await self.app(scope, receive, send)
            return
        endpoint, action = found
        if action == "call" and endpoint.codec.streams:
            scope[STREAM_CALL] = True
            await self.app(scope, receive, _bad_input_as_400(send))
            return
        start: Message = {}
        chunks: list[bytes] = []

        async def buffered(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await _send(send, *translate(endpoint, action, start, b"".join(chunks)))
            else:
                await send(message)

        await self.app(scope, receive, buffered)


def _bad_input_as_400(send: Send) -> Send:
    """``send`` with a 422 start said as BentoML's 400; the body (streamed, maybe) passes as it comes."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start" and message.get("status") == 422:
            message = {**message, "status": 400}
        await send(message)

    return sending


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def translate(
    endpoint: Endpoint, action: str, start: Message, body: bytes
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One taskserve response as BentoML's server would have answered it."""
    status: int = start.get("status", 500)
    headers: list[tuple[bytes, bytes]] = list(start.get("headers", []))
    ctype = _header(headers, b"content-type")
    if status >= 300:
        data = _json(body) if ctype.startswith(b"application/json") else {}
        failed = data.get("status") == TaskStatus.FAILURE.value
        if status == 409:
            # A result not ready, a task that cannot be retried or cancelled yet: BentoML says 400.
            # A failed task's result is the error BentoML's server stored for it: a 500.
            status = 500 if failed else 400
        elif status == 422:
            status = 400  # arguments that fail validation: BentoML's BadInput
        if data.get("status") in STATUS_WORDS:
            data["status"] = STATUS_WORDS[data["status"]]
            body, headers = _replaced(headers, pydantic_core.to_json(data))
        return status, headers, body
    if action in ("get", "call"):
        new = _result(endpoint.codec, body, ctype)
        if new is not None:
            body, ctype = new
            headers = [(k, v) for k, v in headers if k not in (b"content-type", b"content-length")]
            headers += [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
        return status, headers, body
    data = _json(body)
    if "status" in data:
        data["status"] = STATUS_WORDS.get(data["status"], data["status"])
        if action == "status":
            data["executed_at"] = data.get("started_at")
        body, headers = _replaced(headers, pydantic_core.to_json(data))
    return status, headers, body


def _replaced(headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    kept = [(k, v) for k, v in headers if k != b"content-length"]
    return body, [*kept, (b"content-length", str(len(body)).encode())]


def _result(codec: Codec, body: bytes, ctype: bytes) -> tuple[bytes, bytes] | None:
    """A result in BentoML's encoding, or None where taskserve's is BentoML's already (images, files, JSON)."""
    if not ctype.startswith(b"application/json"):
        return None
    if codec.output_kind == "ndarray":
        from .._wire import array_from_wire

        value = pydantic_core.from_json(body)
        if isinstance(value, dict):
            value = array_from_wire(value).tolist()
        return pydantic_core.to_json(value), b"application/json"
    if codec.output_schema.get("type") == "string":
        value = pydantic_core.from_json(body)
        if isinstance(value, str):
            return value.encode(), b"text/plain; charset=utf-8"
    return None


def _json(body: bytes) -> dict[str, Any]:
    try:
        data = pydantic_core.from_json(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    return next((v for k, v in headers if k.lower() == name), b"")


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


# -- a generator's items, streamed ---------------------------------------------------------


def streamed(routes: EndpointRoutes, request: Request, task_id: str, owned: bool) -> StreamingResponse:
    """A generator's direct call as BentoML's server answers it: each item a chunk, as it is yielded.

    A ``str`` item is its text, anything else its JSON. The task runs in a worker and its items
    are read from the store (``queue.outputs``), so any API server streams any task. The stream
    ends with the task; a client that hangs up cancels it, as a direct call's does.
    """
    return StreamingResponse(_items(routes, request, task_id, owned), media_type=STREAM_MEDIA_TYPE)


async def _items(routes: EndpointRoutes, request: Request, task_id: str, owned: bool) -> AsyncIterator[bytes]:
    queue = routes.queue
    watch = queue._watch(task_id)
    sent = 0
    ended = False
    try:
        while True:
            try:
                record = await queue.get(task_id)  # read before the items: all are stored by its end
                items = await queue.outputs(task_id, sent)
            except QueueUnavailable:
                await watch.wait(1.0)
                continue
            for _, data, _ in items:
                item = pydantic_core.from_json(data)
                yield item.encode() if isinstance(item, str) else data
            if items:
                sent = items[-1][0]
            if record.status.is_terminal and len(items) < 10_000:  # 10,000: the most one read returns
                ended = True
                routes.metrics.finished.labels(routes.endpoint.name, record.status.value).inc()
                return
            if not items and await request.is_disconnected():
                return
            await watch.wait(POLL_RUNNING)
    finally:
        watch.close()
        if owned and not ended:
            with contextlib.suppress(InvalidTransition, QueueUnavailable, Exception):
                await queue.cancel(task_id)
