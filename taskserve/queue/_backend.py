"""The contract between ``Queue`` and a store: the hooks each backend implements.

Apart from ``base.py`` so that the rules (``Queue``'s public methods) and what a backend must
provide to carry them out can each be read whole: a new backend implements exactly the
abstract methods below, each atomic in the store itself, and may override the defaults
(push wake-ups, a finish-and-claim in one transaction).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence

from .._types import Claim, Event, NewTask, Outcome, Result, TaskRecord, WorkerInfo
from . import lifecycle


class Watch:
    """Sleeps for the given time; a backend's subclass returns early on a change."""

    async def wait(self, timeout: float) -> None:
        await asyncio.sleep(timeout)

    def close(self) -> None:
        pass


class Backend(abc.ABC):
    """The underscore methods ``Queue`` calls. ``ts`` is this host's clock; a store with its own may ignore it."""

    @abc.abstractmethod
    async def _ping(self) -> None: ...

    @abc.abstractmethod
    async def _enqueue(self, tasks: Sequence[NewTask], ts: float) -> dict[int, str] | None:
        """Store the tasks in one atomic write; returns ``{index: earlier task id}`` for idempotent replays.

        Checks each task's ``idempotency_key`` and ``max_queue`` in that same write (raising
        ``IdempotencyConflict`` or ``QueueFull``, storing nothing).
        """

    @abc.abstractmethod
    async def _get(self, task_id: str) -> TaskRecord | None: ...

    @abc.abstractmethod
    async def _events(self, task_id: str) -> list[Event]:
        """The task's stored events, in order (``lifecycle.history`` makes the whole log of them)."""

    @abc.abstractmethod
    async def _list(
        self, route: str | None, status: str | None, limit: int, before: str | None, owner: str | None = None
    ) -> tuple[list[TaskRecord], str | None]:
        """Up to ``limit`` tasks with ids below ``before``, newest first, and where to go on from.

        With ``owner``, only that owner's tasks, read through a per-owner index.

        A backend may return fewer than ``limit`` with a cursor (it bounds the work of one
        call); the cursor is ``None`` only when nothing older matches.
        """

    @abc.abstractmethod
    async def _get_args(self, task_id: str) -> bytes | None: ...

    @abc.abstractmethod
    async def _get_result(self, task_id: str) -> Result | None: ...

    @abc.abstractmethod
    async def _apply(self, items: list[tuple[str, list[lifecycle.Move]]], ts: float) -> list[bool]:
        """The one write of the state machine: per task, the first move whose guards hold.

        Atomic per task (guards checked and effects made in one transaction or script), and
        safe to re-send after a lost reply. Returns, per task, whether a move was applied.
        """

    @abc.abstractmethod
    async def _report(
        self,
        task_id: str,
        token: str,
        progress: str | None,
        preview: tuple[bytes, str] | None,
        outputs: list[tuple[int, bytes]],
        ts: float,
    ) -> bool: ...

    @abc.abstractmethod
    async def _outputs(self, task_id: str, after: int) -> list[tuple[int, bytes, float]]: ...

    @abc.abstractmethod
    async def _preview(self, task_id: str) -> Result | None: ...

    @abc.abstractmethod
    async def _overdue(self, ts: float) -> list[tuple[str, str, float]]:
        """``(id, "ttl" | "deadline", when)`` of tasks to end: pending past their TTL, active past their deadline."""

    @abc.abstractmethod
    async def _position(self, record: TaskRecord, ts: float) -> int: ...

    @abc.abstractmethod
    async def _lapsed(self, ts: float, worker: str | None) -> list[str]:
        """Running tasks whose lease ran out, for ``lifecycle.lost``.

        With ``worker``, first make every lease that worker holds lapse and forget the worker.
        """

    @abc.abstractmethod
    async def _claim(
        self, routes: list[str], worker: str, limit: int, lease: float, ts: float, min_priority: int | None
    ) -> list[Claim]: ...

    async def _finish_and_claim(
        self, outcomes: list[Outcome], routes: list[str], worker: str, limit: int, lease: float, ts: float
    ) -> list[Claim]:
        await self._apply([(o.id, lifecycle.finished(o)) for o in outcomes], ts)
        return await self._claim(routes, worker, limit, lease, ts, None)

    @abc.abstractmethod
    async def _extend(self, held: dict[str, str], lease: float, ts: float) -> set[str]: ...

    @abc.abstractmethod
    async def _still_held(self, held: dict[str, str]) -> set[str]: ...

    @abc.abstractmethod
    async def _purge(self, ts: float) -> int: ...

    @abc.abstractmethod
    async def _counts(self) -> dict[tuple[str, str], int]: ...

    @abc.abstractmethod
    async def _finished_counts(self) -> dict[tuple[str, str], int]: ...

    @abc.abstractmethod
    async def _longest_waits(self, routes: list[str]) -> dict[str, float]: ...

    @abc.abstractmethod
    async def _heartbeat(self, info: WorkerInfo, ttl: float, ts: float) -> None: ...

    @abc.abstractmethod
    async def _workers(self, ts: float) -> list[WorkerInfo]: ...

    @abc.abstractmethod
    async def _forget_worker(self, worker: str) -> None: ...

    @abc.abstractmethod
    async def _take_webhooks(self, limit: int, lease: float, tries: int, ts: float) -> list[tuple[str, int]]: ...

    @abc.abstractmethod
    async def _webhook_result(
        self, task_id: str, attempt: int, error: str | None, retry_in: float | None, ts: float
    ) -> bool: ...

    async def _wait_for_work(self, routes: list[str], timeout: float) -> None:
        await asyncio.sleep(timeout)

    def _watch(self, task_id: str) -> Watch:
        """A handle that wakes when the task may have changed; backends with push override it."""
        return Watch()
