"""An httpx async transport that sends through aiohttp: what ``AsyncHTTPClient`` uses when aiohttp is installed.

Measured in ``bench/clients.py``: one client shared by 256 coroutines keeps (and passes) its
8-coroutine rate through aiohttp, where httpx's own pool loses more than half of it. httpx stays
the interface (requests, responses, timeouts, errors, the ``transport=`` plug point); only the
wire work moves. Responses stream, so server-sent events work through it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import aiohttp
import httpx
import yarl

CONNECTIONS = 256  # open at most; callers beyond wait for one, as in httpx's pool
STREAM_AT = 1024 * 1024  # request bodies over this are streamed to aiohttp, not read whole first


class _Stream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _translate(exc) from exc

    async def aclose(self) -> None:
        self._response.release()


def _translate(exc: BaseException) -> httpx.TransportError:
    """aiohttp's errors as httpx's, which the clients already turn into ``ClientError``."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return httpx.ReadTimeout(message)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(message)
    return httpx.NetworkError(message)


async def _chunks(stream: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """A request body as httpx makes it (a multipart upload reads its files a chunk at a time), for aiohttp."""
    async for chunk in stream:
        yield chunk


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests over one aiohttp session, made on first use in the running event loop.

    Args:
        connections: connections open at most (all kept alive while idle, for 30 s).

    Example:
        >>> client = taskserve.AsyncHTTPClient(url, transport=AiohttpTransport(connections=64))
    """

    def __init__(self, *, connections: int = CONNECTIONS) -> None:
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._connections, keepalive_timeout=30.0)
            # httpx decodes content-encoding and manages cookies itself.
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.get("pool"),
            sock_connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
        )
        body: bytes | AsyncIterator[bytes]
        if int(request.headers.get("content-length", "0")) > STREAM_AT:
            body = _chunks(request.stream)  # type: ignore[arg-type]
        else:
            body = await request.aread()
        try:
            response = await self._open().request(
                request.method,
                yarl.URL(str(request.url), encoded=True),
                headers=list(request.headers.multi_items()),
                data=body or None,
                timeout=timeout,
                allow_redirects=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            )
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _translate(exc) from exc
        return httpx.Response(
            response.status, headers=list(response.raw_headers), stream=_Stream(response), extensions={}
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
