"""The transports the clients use by default: several small httpx pools instead of one large one.

httpcore's pool scans its connections and requests on every request and every release, under
one lock, so one pool with hundreds of connections spends more CPU on bookkeeping the more
callers share it (encode/httpx#3215); with httpx's default of 20 kept-alive connections out of
100, a busy client also closes and reopens connections all the time. Several pools of a few
connections each, every connection kept alive, keep the per-request cost flat: each request
goes to the pool with the fewest requests in flight. ``bench/clients.py`` has the numbers.
"""

from __future__ import annotations

import threading
from types import TracebackType

import httpx

POOLS = 8
PER_POOL = 32  # 256 connections in all: one per caller at the 256 concurrent callers measured
# Without aiohttp, the async client measured best with more, smaller pools (same 256 connections).
ASYNC_POOLS = 32
ASYNC_PER_POOL = 8


STREAM = "taskserve.stream"  # a request extension: the response is read by its caller, as it comes


def _limits(per_pool: int) -> httpx.Limits:
    return httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool, keepalive_expiry=30.0)


class AsyncPoolsTransport(httpx.AsyncBaseTransport):
    """An httpx async transport spreading requests over ``pools`` pools of ``per_pool`` connections.

    Args:
        pools: how many independent connection pools.
        per_pool: connections each pool opens and keeps alive, at most.

    Example:
        >>> client = taskserve.AsyncHTTPClient(url, transport=AsyncPoolsTransport(pools=4, per_pool=16))
    """

    def __init__(self, *, pools: int = POOLS, per_pool: int = PER_POOL) -> None:
        self._pools = [httpx.AsyncHTTPTransport(limits=_limits(per_pool)) for _ in range(max(1, pools))]
        self._busy = [0] * len(self._pools)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        k = self._busy.index(min(self._busy))  # one event loop: no lock needed
        self._busy[k] += 1
        try:
            response = await self._pools[k].handle_async_request(request)
            # Read here, so the connection is back in its pool before the count drops; an event
            # stream is read as it comes, by its caller.
            if not request.extensions.get(STREAM):
                await response.aread()
            return response
        finally:
            self._busy[k] -= 1

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()

    async def __aenter__(self) -> AsyncPoolsTransport:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None = None, e: BaseException | None = None, tb: TracebackType | None = None
    ) -> None:
        await self.aclose()


class PoolsTransport(httpx.BaseTransport):
    """The blocking twin of ``AsyncPoolsTransport``, safe to share between threads.

    Example:
        >>> client = taskserve.SyncHTTPClient(url, transport=PoolsTransport(pools=4, per_pool=16))
    """

    def __init__(self, *, pools: int = POOLS, per_pool: int = PER_POOL) -> None:
        self._pools = [httpx.HTTPTransport(limits=_limits(per_pool)) for _ in range(max(1, pools))]
        self._busy = [0] * len(self._pools)
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            k = self._busy.index(min(self._busy))
            self._busy[k] += 1
        try:
            response = self._pools[k].handle_request(request)
            if not request.extensions.get(STREAM):
                response.read()
            return response
        finally:
            with self._lock:
                self._busy[k] -= 1

    def close(self) -> None:
        for pool in self._pools:
            pool.close()


def default_async_transport() -> httpx.AsyncBaseTransport:
    """aiohttp's wire when installed (``taskserve[aiohttp]``), else many small httpx pools."""
    try:
        from ._aiohttp import AiohttpTransport
    except ImportError:
        return AsyncPoolsTransport(pools=ASYNC_POOLS, per_pool=ASYNC_PER_POOL)
    return AiohttpTransport()


def default_transport() -> httpx.BaseTransport:
    return PoolsTransport()
