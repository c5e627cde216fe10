"""Claims a worker holds but has not started: most urgent first, never started once stale.

A worker claims quick tasks ahead of its free slots (one claim for many tasks). Those wait
here, ordered by priority then arrival, each with the time its lease surely holds until
(the claim's time, or the last renewal, plus the lease). A claim past that time may have been
re-queued by another process's recovery and handed to someone else, so it is dropped
unstarted: starting it could run the task twice.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Iterable

from .._types import Claim

logger = logging.getLogger("taskserve.worker")


class ClaimBuffer:
    def __init__(self, lease: float) -> None:
        self.lease = lease
        self._heap: list[tuple[int, int, Claim]] = []
        self._arrival = itertools.count()
        # task id -> monotonic time its lease surely holds until; running claims keep theirs too.
        self.held_until: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._heap)

    def hold(self, claims: Iterable[Claim], since: float) -> None:
        """Keep fresh claims, taken at ``since`` (monotonic), until they are started."""
        for claim in claims:
            self.held_until[claim.id] = since + self.lease
            self.push_back(claim)

    def push_back(self, claim: Claim) -> None:
        """Return a claim that was taken out but not started (its lease time is kept)."""
        heapq.heappush(self._heap, (-claim.priority, next(self._arrival), claim))

    def renewed(self, task_ids: Iterable[str], since: float) -> None:
        for task_id in task_ids:
            if task_id in self.held_until:
                self.held_until[task_id] = since + self.lease

    @property
    def top_priority(self) -> int:
        return -self._heap[0][0]

    def pop(self, like: Claim | None = None) -> Claim | None:
        """The most urgent claim whose lease surely still holds; stale ones are dropped.

        With ``like``, only a claim of the same route and priority and without a time limit
        of its own (to run in ``like``'s sequence); None if the most urgent is another.
        """
        while self._heap:
            claim = self._heap[0][2]
            if like is not None and not _alike(claim, like):
                return None
            heapq.heappop(self._heap)
            if time.monotonic() < self.held_until.get(claim.id, 0.0):
                return claim
            self.held_until.pop(claim.id, None)
            logger.warning("claim of task %s lapsed before it could start; leaving it to the queue", claim.id)
        return None

    def count(self, route: str) -> int:
        return sum(1 for entry in self._heap if entry[2].route == route)

    def pop_route(self, route: str, limit: int) -> list[Claim]:
        """Up to ``limit`` claims of ``route``, most urgent first, whatever their priority (a batch)."""
        mine = sorted(entry for entry in self._heap if entry[2].route == route)[:limit]
        if not mine:
            return []
        taken = {entry[2].id for entry in mine}
        self._heap = [entry for entry in self._heap if entry[2].id not in taken]
        heapq.heapify(self._heap)
        now, fresh = time.monotonic(), []
        for _, _, claim in mine:
            if now < self.held_until.get(claim.id, 0.0):
                fresh.append(claim)
                continue
            self.held_until.pop(claim.id, None)
            logger.warning("claim of task %s lapsed before it could start; leaving it to the queue", claim.id)
        return fresh

    def claims(self) -> list[Claim]:
        return [entry[2] for entry in self._heap]

    def take_all(self) -> list[Claim]:
        """Empty the buffer (to hand the claims back at shutdown)."""
        claims = self.claims()
        self._heap.clear()
        return claims

    def drop(self, task_ids: set[str]) -> None:
        """Forget claims the worker no longer holds (cancelled, lease lost)."""
        if any(entry[2].id in task_ids for entry in self._heap):
            self._heap = [entry for entry in self._heap if entry[2].id not in task_ids]
            heapq.heapify(self._heap)

    def done(self, task_id: str) -> None:
        """The claim's outcome was recorded: no lease of it to keep any more."""
        self.held_until.pop(task_id, None)


def _alike(claim: Claim, like: Claim) -> bool:
    """Whether ``claim`` may run in ``like``'s sequence: same route and priority, no time limit."""
    return claim.route == like.route and claim.priority == like.priority and claim.timeout is claim.deadline is None
