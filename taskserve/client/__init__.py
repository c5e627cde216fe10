"""HTTP clients for a taskserve service: ``SyncHTTPClient`` and ``AsyncHTTPClient``."""

from __future__ import annotations

from ._transport import AsyncPoolsTransport, PoolsTransport
from .aio import AsyncHTTPClient, AsyncTask
from .sync import SyncHTTPClient, Task

__all__ = ["AsyncHTTPClient", "AsyncPoolsTransport", "AsyncTask", "PoolsTransport", "SyncHTTPClient", "Task"]
