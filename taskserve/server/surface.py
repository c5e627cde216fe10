"""What every HTTP answer carries, and which ``Host`` a request may name.

- ``X-Content-Type-Options: nosniff`` on every response, errors included: a browser then
  renders a body only as the type it was sent with, never as HTML it guessed.
- ``--allowed-host``: with a list, a request whose ``Host`` names another host is refused
  (400, JSON) before any route runs. Without one, any host is served, as a server on a
  trusted network expects; but then a web page can reach a server on ``localhost`` by
  DNS rebinding (its own name, re-pointed at 127.0.0.1, is "same origin" to the browser),
  so a server a browser can reach should list the names it is reached by.
- File results (``Path``, ``bytes``) are served as attachments of a type that a browser will
  not render: a result named ``report.html`` by whoever uploaded it must not run as a page
  of this origin. Images and JSON results keep their own types.

Wrapped around Starlette's whole stack (its error middleware included), so no answer escapes it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._types import Result

NOSNIFF = (b"x-content-type-options", b"nosniff")
INLINE_TYPES = frozenset({"application/json"})  # and images, from an endpoint declared to return one
_NAME = re.compile(r';\s*name="((?:[^"\\]|\\.)*)"')


class Surface:
    """ASGI middleware: the ``nosniff`` header on every response, and the ``Host`` check."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | None = None) -> None:
        self.app = app
        hosts = None if allowed_hosts is None else [h.strip().lower() for h in allowed_hosts if h.strip()]
        self.exact = frozenset(h for h in hosts or () if not h.startswith("*."))
        self.suffixes = tuple(h[1:] for h in hosts or () if h.startswith("*."))  # "*.example.com" → ".example.com"
        self.check = bool(hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.check and not self.allowed(scope):
            host = _host_header(scope) or ""
            message = (
                f"This server does not answer to the host {host[:100]!r}; "
                "reach it by one of the names in its --allowed-host list."
            )
            await JSONResponse({"error": message}, status_code=400, headers={"X-Content-Type-Options": "nosniff"})(
                scope, receive, send
            )
            return

        async def send_nosniff(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                if not any(k.lower() == NOSNIFF[0] for k, _ in headers):  # a route may set it itself (/ui)
                    message["headers"] = [*headers, NOSNIFF]
            await send(message)

        await self.app(scope, receive, send_nosniff)

    def allowed(self, scope: Scope) -> bool:
        host = _host_header(scope)
        if host is None:
            return False
        name = _hostname(host)
        return name in self.exact or (bool(self.suffixes) and name.endswith(self.suffixes))


def _host_header(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == b"host":
            return str(value.decode("latin-1"))
    return None


def _hostname(host: str) -> str:
    """``Host`` without its port: ``[::1]:3000`` → ``[::1]``, ``Example.com:80`` → ``example.com``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class App(Starlette):
    """Starlette with ``Surface`` outside its whole middleware stack (built lazily, as Starlette does)."""

    allowed_hosts: list[str] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        return Surface(super().build_middleware_stack(), self.allowed_hosts)


def result_headers(result: Result, output_kind: str, task_id: str) -> tuple[str, dict[str, str]]:
    """The content type and headers of a stored result as served.

    JSON stays JSON and an image endpoint's image stays inline. Anything else (files, bytes, a
    ``Path`` from an endpoint declared to return something else) is ``application/octet-stream``
    as an attachment, named by the worker's file name when it had one: the type the worker
    guessed from that name (``text/html`` for ``report.html``) is never sent.
    """
    base = result.content_type.split(";", 1)[0].strip().lower()
    headers = {"X-Task-Id": task_id}
    if base in INLINE_TYPES or (output_kind == "image" and base.startswith("image/")):
        return result.content_type, headers
    match = _NAME.search(result.content_type)
    name = re.sub(r"\\(.)", r"\1", match.group(1)) if match else f"{task_id}.bin"
    headers["Content-Disposition"] = content_disposition(name)
    return "application/octet-stream", headers


def content_disposition(name: str) -> str:
    """``attachment`` with the name twice: plain ASCII for old clients, and RFC 6266's UTF-8 form."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\%;' else "_" for c in name) or "result.bin"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"
