"""uvicorn's HTTP protocol with the bounds a server facing the open network needs.

uvicorn bounds neither how long a client may take to send its request headers (a
"slowloris" client that sends a byte every few seconds holds a connection for ever), nor how
many connections are open, and it answers a malformed request, or a connection past its own
``limit_concurrency``, with ``text/plain``. This subclass, of whichever parser uvicorn would
pick (httptools, else h11), adds:

- a header timeout: a connection whose next request line and headers are not all in within
  ``header_timeout`` seconds (from its opening, or from the end of the previous response) is
  answered 408 if it sent part of them, and closed;
- a connection cap: past ``max_connections`` open connections a new one is answered 503
  with ``Retry-After`` at once, before anything is read, and closed;
- JSON bodies, ``{"error": ...}``, on both, and on the 400 for a request that is not HTTP.

The request body's own timeout is the app's (``server/inputs.py``): only the handler knows
when it reads the body. Nothing here runs per request but a timer's cancel and re-arm.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

HEADERS_TOO_SLOW = "The request headers did not arrive within {timeout:g}s; the connection is closed."
TOO_MANY = "The server has {cap} connections open, its limit; try again in a moment."
NOT_HTTP = (
    "The request is not valid HTTP/1.1: a malformed request line or header, a header over the size limit, "
    "or a bad body framing. Send a well-formed request."
)
PHRASES = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}


def error_response(status: int, message: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole HTTP/1.1 response, written to the socket as is: JSON ``{"error": ...}``, then close."""
    body = json.dumps({"error": message}).encode()
    head = [
        b"HTTP/1.1 %d %s" % (status, PHRASES[status]),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"x-content-type-options: nosniff",
        b"connection: close",
        *(name + b": " + value for name, value in extra),
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class _Guard:
    """What both parsers share; ``_headers_in`` is called by each once a request's headers are parsed."""

    header_timeout: float
    max_connections: int | None
    # from uvicorn's protocol classes
    connections: set[Any]
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    _header_timer: asyncio.TimerHandle | None = None
    _partial = False  # bytes of the next request came in, not yet its whole headers

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self.connections.discard(self)
            retry = [(b"retry-after", b"1")]
            transport.write(error_response(503, TOO_MANY.format(cap=self.max_connections), retry))
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._header_timer is not None:
            self._partial = True
        super().data_received(data)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        self._arm()  # before: a pipelined request already buffered is parsed inside, and disarms
        super().on_response_complete()  # type: ignore[misc]

    def _arm(self) -> None:
        self._disarm()
        self._partial = False
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_in(self) -> None:
        self._disarm()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._partial:
            self.transport.write(error_response(408, HEADERS_TOO_SLOW.format(timeout=self.header_timeout)))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self.transport.write(error_response(400, NOT_HTTP))
        self.transport.close()


def protocol_class(header_timeout: float, max_connections: int | None) -> type[Any]:
    """The protocol class to give ``uvicorn.Config(http=...)``: httptools if installed, else h11."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is a dependency, but uvicorn runs without it
        return _h11(header_timeout, max_connections)

    class GuardedHttpTools(_Guard, HttpToolsProtocol):  # type: ignore[misc]  # uvicorn narrows the transport
        def on_headers_complete(self) -> None:
            self._headers_in()
            super().on_headers_complete()

    GuardedHttpTools.header_timeout = header_timeout
    GuardedHttpTools.max_connections = max_connections
    return GuardedHttpTools


def _h11(header_timeout: float, max_connections: int | None) -> type[Any]:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(_Guard, H11Protocol):  # type: ignore[misc]  # as above
        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a request's headers were parsed
                self._headers_in()

    GuardedH11.header_timeout = header_timeout
    GuardedH11.max_connections = max_connections
    return GuardedH11
