"""What bench/events.py serves: a task reporting progress, and generator tasks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import taskserve


@taskserve.service(name="events")
class Events:
    @taskserve.task
    def noop(self, n: int) -> int:
        return n

    @taskserve.task
    def report(self, n: int) -> int:
        """Reports progress ``n`` times as fast as it can (a model's inner loop)."""
        for i in range(n):
            taskserve.progress((i + 1) / n, f"step {i + 1}/{n}")
        return n

    @taskserve.task
    def stream(self, n: int) -> Iterator[int]:
        """Yields ``n`` items as fast as it can."""
        yield from range(n)

    @taskserve.task
    async def tokens(self, n: int, pause: float = 0.0) -> AsyncIterator[int]:
        """Yields ``n`` items, ``pause`` seconds apart (an LLM writing tokens)."""
        for i in range(n):
            if pause:
                await asyncio.sleep(pause)
            yield i
