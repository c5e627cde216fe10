"""What the sync and async clients share: no I/O here, only encoding and decoding."""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import json
import mimetypes
import os
import pathlib
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import httpx
import pydantic_core

from .._types import TaskStatus
from .._wire import array_from_wire, array_to_npy, array_to_wire, is_ndarray, load_image
from ..exceptions import (
    AuthenticationError,
    ClientError,
    IdempotencyConflict,
    InvalidTransition,
    PayloadTooLarge,
    QueueFull,
    QueueUnavailable,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    TaskNotReady,
    ValidationFailed,
)

DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
WAIT_CHUNK = 60.0


@dataclass
class EndpointInfo:
    name: str
    route: str
    task: bool
    output_kind: str = "json"
    files: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    wait_many: str | None = None  # the bulk wait route; None on a server that predates it

    @classmethod
    def from_schema(cls, entry: dict[str, Any]) -> EndpointInfo:
        properties = (entry.get("input") or {}).get("properties") or {}
        return cls(
            entry["name"],
            entry["route"],
            entry["task"],
            entry.get("output", {}).get("kind", "json"),
            entry.get("files", []),
            list(properties),
            (entry.get("bulk") or {}).get("wait_many"),
        )


def parse_schema(data: Any) -> dict[str, EndpointInfo]:
    try:
        return {e["name"]: EndpointInfo.from_schema(e) for e in data["endpoints"]}
    except (KeyError, TypeError) as exc:
        raise ClientError(f"The server's /schema.json is not a taskserve schema ({exc!r}); is the URL right?") from None


def _file_part(name: str, value: Any, files: contextlib.ExitStack) -> tuple[str, bytes | IO[bytes], str] | None:
    """A value to send as a file, or None if it is plain JSON.

    A ``Path`` is sent from its open file (closed by ``files``), which httpx reads a chunk at
    a time: a client uploading a video never holds it whole in memory.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return (name, bytes(value), "application/octet-stream")
    if isinstance(value, os.PathLike):
        path = pathlib.Path(value)
        return (path.name, files.enter_context(path.open("rb")), "application/octet-stream")
    if type(value).__module__.startswith("PIL.") and hasattr(value, "save"):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return (f"{name}.png", buf.getvalue(), "image/png")
    if hasattr(value, "read") and callable(value.read):
        data = value.read()
        data = data.encode() if isinstance(data, str) else data
        return (os.path.basename(getattr(value, "name", "") or name), data, "application/octet-stream")
    return None


def _jsonable(value: Any) -> Any:
    if is_ndarray(value):  # typed, so dtype and shape arrive as they are here
        return array_to_wire(value)
    return pydantic_core.to_jsonable_python(value, fallback=_fallback)


def _fallback(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"Cannot send a {type(value).__name__} as an argument; use JSON types, bytes, a Path or an image.")


@contextlib.contextmanager
def request_arguments(kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``encode_arguments`` for one request: the files it opened are closed once the request is done."""
    with contextlib.ExitStack() as files:
        yield encode_arguments(kwargs, files)


def encode_arguments(kwargs: dict[str, Any], files_opened: contextlib.ExitStack) -> dict[str, Any]:
    """httpx request arguments: JSON, or multipart when any argument is a file or image (arrays then go as .npy)."""
    files = {k: part for k, v in kwargs.items() if (part := _file_part(k, v, files_opened)) is not None}
    if not files:
        body = {k: _jsonable(v) for k, v in kwargs.items()}
        return {"content": pydantic_core.to_json(body), "headers": {"content-type": "application/json"}}
    data = {}
    for k, v in kwargs.items():
        if k in files:
            continue
        if is_ndarray(v):
            files[k] = (f"{k}.npy", array_to_npy(v), "application/x-npy")
        else:
            data[k] = v if isinstance(v, str) else pydantic_core.to_json(_jsonable(v)).decode()
    return {"data": data, "files": files}


def encode_json_item(kwargs: dict[str, Any]) -> dict[str, Any]:
    """One item of submit_many: JSON only, so files travel as base64."""
    out = {}
    with contextlib.ExitStack() as files:
        for k, v in kwargs.items():
            part = _file_part(k, v, files)
            if part is None:
                out[k] = _jsonable(v)
            else:
                content = part[1] if isinstance(part[1], bytes) else part[1].read()
                out[k] = base64.b64encode(content).decode()
    return out


def decode_result(info: EndpointInfo, response: httpx.Response) -> Any:
    """The result as its Python type: arrays with their dtype, images in safe formats only, files in a new temp file."""
    ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        value = response.json()
        if info.output_kind == "ndarray":
            return array_from_wire(value)
        return value
    if ctype == "application/x-npy":
        return array_from_wire(response.content)
    if ctype.startswith("image/") or info.output_kind == "image":
        return load_image(response.content)  # never EPS or PDF, which Pillow would hand to Ghostscript
    if info.output_kind == "file":
        return _save_result(response.content, ctype)
    return response.content


_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}")


def _save_result(content: bytes, ctype: str) -> pathlib.Path:
    """A new private file (0600) named by us: nothing the server says becomes part of a path, but for a
    suffix from the standard table of content types."""
    suffix = mimetypes.guess_extension(ctype) or ".bin"
    fd, name = tempfile.mkstemp(prefix="taskserve-result-", suffix=suffix if _SUFFIX.fullmatch(suffix) else ".bin")
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    return pathlib.Path(name)


def auth_headers(headers: dict[str, str] | None, api_key: str | None) -> dict[str, str]:
    """The client's headers with its API key (``api_key``, else ``TASKSERVE_API_KEY``) as a bearer token."""
    key = api_key if api_key is not None else os.environ.get("TASKSERVE_API_KEY")
    # Stripped: a key read from a file or a secret store often ends in a newline, which no HTTP
    # header may hold (httpx would refuse it as if the server could not be reached). A blank key
    # is none, so the server's 401 says that one is needed.
    key = key.strip() if key else None
    out = dict(headers or {})
    if key:
        out["Authorization"] = f"Bearer {key}"
    return out


def error_message(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    return str(body.get("error") or f"HTTP {response.status_code} from {response.request.url}"), body


def raise_for_response(response: httpx.Response, task: Any = None) -> None:
    """Turn an error answer into the matching taskserve exception."""
    if response.status_code < 400:
        return
    message, body = error_message(response)
    code = response.status_code
    status = body.get("status")
    if code == 401:
        if not response.request.headers.get("authorization"):
            message = f"The server at {response.request.url.host} needs an API key: give the client api_key= "
            message += "or set TASKSERVE_API_KEY."
        raise AuthenticationError(message)
    if code == 422:
        raise ValidationFailed(message, body.get("detail"))
    if code == 404:
        raise TaskNotFound(task.id if task is not None else message)
    if code == 413:
        raise PayloadTooLarge(message)
    if code == 503:
        raise QueueUnavailable(message)
    if code == 429:
        retry_after = body.get("retry_after", response.headers.get("retry-after"))
        try:
            seconds = float(retry_after) if retry_after is not None else None
        except ValueError:
            seconds = None
        raise QueueFull(message, seconds)
    if code == 409 and "idempotency_key" in body:
        raise IdempotencyConflict(str(body["idempotency_key"]), str(body.get("task_id")))
    if code == 409 and "task_error" not in body:  # a cancel or retry in the wrong state, not a result answer
        raise InvalidTransition(message, status)
    if status in ("pending", "in_progress"):
        raise TaskNotReady(message, task, TaskStatus(status))
    if status == "failure":
        raise TaskFailed(body.get("task_error") or message, task, TaskStatus.FAILURE)
    if status == "cancelled":
        raise TaskCancelled(message, task, TaskStatus.CANCELLED)
    raise ClientError(message, code)


def option_params(
    params: list[tuple[str, str]],
    *,
    priority: int | None = None,
    delay: float | datetime.timedelta | None = None,
    run_at: datetime.datetime | str | None = None,
    ttl: float | datetime.timedelta | None = None,
    timeout: float | datetime.timedelta | None = None,
    deadline: datetime.datetime | str | float | datetime.timedelta | None = None,
    idempotency_key: str | None = None,
    webhook: str | None = None,
    tags: dict[str, str] | None = None,
) -> list[tuple[str, str]]:
    """``params`` with these submit options added, as the query parameters the server reads.

    A naive ``run_at`` or ``deadline`` datetime is taken as local time (Python's rule); a string
    goes as it is; a ``deadline`` in seconds (or a ``timedelta``) counts from now. The server
    validates every value and answers 422 naming the one it cannot use.
    """
    given: dict[str, str] = {}
    if priority is not None:
        given["priority"] = str(int(priority))
    if delay is not None:
        given["delay"] = repr(_seconds(delay))
    if run_at is not None:
        given["run_at"] = _instant(run_at)
    if ttl is not None:
        given["ttl"] = repr(_seconds(ttl))
    if timeout is not None:
        given["timeout"] = repr(_seconds(timeout))
    if deadline is not None:
        if isinstance(deadline, (int, float, datetime.timedelta)):
            deadline = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=_seconds(deadline))
        given["deadline"] = _instant(deadline)
    if idempotency_key is not None:
        given["idempotency_key"] = str(idempotency_key)
    if webhook is not None:
        given["webhook"] = str(webhook)
    kept = [(k, v) for k, v in params if k not in given and not (tags is not None and k == "tag")]
    return kept + list(given.items()) + [("tag", f"{k}:{v}") for k, v in (tags or {}).items()]


def _seconds(value: float | datetime.timedelta) -> float:
    return value.total_seconds() if isinstance(value, datetime.timedelta) else float(value)


def _instant(value: datetime.datetime | str) -> str:
    return value.astimezone().isoformat() if isinstance(value, datetime.datetime) else str(value)


def retry_body(overrides: dict[str, Any]) -> dict[str, Any]:
    """The request arguments of a retry: the argument overrides as a JSON object (files as base64)."""
    if not overrides:
        return {}
    return {
        "content": pydantic_core.to_json(encode_json_item(overrides)),
        "headers": {"content-type": "application/json"},
    }


@dataclass
class TaskEvent:
    """One event of ``task.events()``: ``kind`` is ``status``, ``progress`` or ``output``.

    ``data`` is the status JSON, the progress (``fraction``, ``message``, ``at``, ``preview``)
    or the item the task yielded; ``id`` is where a resumed stream goes on from.
    """

    kind: str
    id: str
    data: Any

    @property
    def final(self) -> bool:
        """The task's terminal status: the last event of the stream."""
        return self.kind == "status" and TaskStatus(self.data["status"]).is_terminal


class SSEParser:
    """Server-Sent Events from lines, as the text/event-stream format defines them."""

    def __init__(self) -> None:
        self.kind, self.id, self.data = "message", "", list[str]()

    def feed(self, line: str) -> TaskEvent | None:
        if not line:
            if not self.data:
                return None
            event = TaskEvent(self.kind, self.id, json.loads("\n".join(self.data)))
            self.kind, self.data = "message", []
            return event
        if line.startswith(":"):
            return None  # a keep-alive comment
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.kind = value
        elif name == "data":
            self.data.append(value)
        elif name == "id":
            self.id = value
        return None


RECONNECTS = 30  # tries to resume a broken event stream before giving up
PROGRESS_POLL = 0.5  # seconds of one long poll while a caller follows progress


def progress_changed(status: dict[str, Any], last: Any) -> tuple[bool, Any]:
    """Whether a status carries a progress other than the one last seen, and its mark."""
    progress = status.get("progress")
    mark = None if progress is None else progress.get("at")
    return progress is not None and mark != last, mark


def request_timeout(kwargs: dict[str, Any]) -> None:
    """Give waiting requests time enough: direct calls none at all, long polls their wait plus slack."""
    if "timeout" in kwargs and kwargs["timeout"] is None:
        kwargs["timeout"] = httpx.Timeout(None, connect=10.0)
    params = kwargs.get("params") or {}
    if "timeout" in params:
        kwargs["timeout"] = httpx.Timeout(float(params["timeout"]) + 30.0, connect=10.0)


def transport_error(url: Any, exc: Exception) -> ClientError:
    return ClientError(f"Cannot reach the taskserve server at {url}: {exc}.")
