"""How long a client refused for a full queue should wait: from how fast the route drains.

``max_queue`` turns a flood into honest ``429`` answers instead of a backlog nobody will
wait for; the ``Retry-After`` they carry is worth following only if it is an estimate, not
a constant. The rate comes from the store's tallies of finished tasks (every worker's, on
every host), sampled when a refusal needs it, over the last minute.
"""

from __future__ import annotations

import collections
import math
import time

from ..queue.base import Queue

WINDOW = 60.0  # seconds of history the rate is taken over
UNKNOWN = 5  # seconds to suggest before any drain was observed
LONGEST = 300  # never suggest a longer wait than this


class DrainRate:
    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self._samples: dict[str, collections.deque[tuple[float, int]]] = {}

    async def retry_after(self, route: str, excess: int) -> int:
        """Whole seconds until ``excess`` tasks of ``route`` are likely to have left the queue."""
        finished = await self.queue.finished_counts()
        total = sum(n for (r, _), n in finished.items() if r == route)
        ts = time.monotonic()
        samples = self._samples.setdefault(route, collections.deque())
        if not samples or ts - samples[-1][0] >= 1.0:
            samples.append((ts, total))
        while len(samples) > 1 and ts - samples[0][0] > WINDOW:
            samples.popleft()
        since, before = samples[0]
        rate = (total - before) / (ts - since) if ts - since >= 1.0 else 0.0
        if rate <= 0:
            return UNKNOWN
        return max(1, min(LONGEST, math.ceil(max(1, excess) / rate)))
