"""What the API knows of the workers: the store's registry of heartbeats, read at most once a second.

Workers report themselves through the store, so a worker on another host counts the same as
one this process started. ``/readyz``, ``/workers``, the status of a waiting task and the
direct call's "no worker is serving this route" all read it from here.
"""

from __future__ import annotations

import time

from .._types import WorkerInfo
from ..queue.base import Queue

CACHE = 1.0  # seconds a read of the registry is reused


class WorkerView:
    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self._cached: list[WorkerInfo] = []
        self._read_at = -CACHE

    async def live(self) -> list[WorkerInfo]:
        """Live workers of every host; raises ``QueueUnavailable`` if the store cannot be read."""
        now = time.monotonic()
        if now - self._read_at >= CACHE:
            self._cached = await self.queue.workers()
            self._read_at = now
        return self._cached

    async def serving(self, route: str) -> int:
        """Workers that serve ``route`` or are starting to (building the service, loading a model)."""
        return sum(1 for w in await self.live() if route in w.routes and w.state != "stopping")

    async def ready_by_route(self, routes: list[str]) -> dict[str, int]:
        workers = await self.live()
        return {r: sum(1 for w in workers if r in w.routes and w.state == "ready") for r in routes}

    def no_worker_message(self, route: str) -> str:
        return (
            f"No worker is serving {route} on the broker {self.queue.describe()}. Start workers for this "
            "service (taskserve serve --workers N, or taskserve worker) with the same --broker; a SQLite "
            "path is relative to the working directory unless it is absolute."
        )
