"""asyncio helpers that keep a cancel from being lost.

On Python 3.10 and 3.11, ``asyncio.wait_for(event.wait(), t)`` returns normally when the task
is cancelled in the same turn of the loop as the event is set: the cancel is swallowed, and a
loop around it runs on. Such a loop then held a worker's stop for a heartbeat period and an API
server's shutdown for ever (its maintenance jobs never ended). ``asyncio.wait`` never swallows a
cancel, so the waits here are built on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; ``True`` if it was set."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=max(0.0, timeout))
    finally:
        if not waiter.done():
            waiter.cancel()
    return event.is_set()


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]], step: float = 0.05) -> None:
    """Cancel each task, again and again until it has ended (a cancel may be swallowed, above)."""
    for task in tasks:
        while not task.done():
            task.cancel()
            await asyncio.wait((task,), timeout=step)
