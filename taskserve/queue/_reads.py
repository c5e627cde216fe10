"""The read-only half of ``Queue``: a task's record, result, events and outputs, listings, tallies.

Apart from ``base.py`` because none of it changes the store or holds a rule of the state
machine: these are the API server's and the operator's views, each a thin check over a
backend hook, and ``list`` carries the tag filter's bounded scan. ``Queue`` inherits it, so
its public API is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._types import Event, Result, TaskRecord, TaskStatus, event_seq
from ..exceptions import TaskNotFound
from . import lifecycle
from ._backend import Backend

# A tag filter looks at most this many of the newest matching tasks per page (no index on tags).
TAG_WINDOW = 10_000


class Reads(Backend):
    """What ``Queue`` answers without writing: mixed into it, never used alone."""

    async def get(self, task_id: str, route: str | None = None, owner: str | None = None) -> TaskRecord:
        """The task's record; ``TaskNotFound`` if unknown, expired, of another route or another owner.

        ``owner`` is the caller's API key owner (``None``: anyone's task, as for an admin key or
        a server without keys). Another owner's task is answered exactly as an unknown one, so
        a caller cannot even learn that an id exists.
        """
        record = await self._get(task_id)
        if record is None or (route is not None and record.route != route):
            raise TaskNotFound(task_id)
        if owner is not None and record.owner != owner:
            raise TaskNotFound(task_id)
        return record

    async def get_result(self, task_id: str) -> Result | None:
        return await self._get_result(task_id)

    async def original_args(self, task_id: str) -> bytes:
        """The stored arguments of a task (a retry with overrides merges over them)."""
        args = await self._get_args(task_id)
        if args is None:
            raise TaskNotFound(task_id)
        return args

    async def events(self, task_id: str, after: str | None = None) -> list[Event]:
        """The task's event log after the event id ``after`` (all of it without), oldest first.

        Every status change appends an event in the same atomic write that makes it, so the log
        and the status never disagree; ids are stable, so a reader resumes where it stopped.

        Example:
            >>> [e.data["status"] for e in await queue.events(task_id)]
            ['pending', 'in_progress', 'success']
        """
        after_seq = event_seq(after)
        record = await self._get(task_id)
        if record is None:
            return []
        return [e for e in lifecycle.history(record, await self._events(task_id)) if event_seq(e.id) > after_seq]

    async def outputs(self, task_id: str, after: int = 0) -> list[tuple[int, bytes, float]]:
        """The items a generator task yielded, ``(number, JSON, when)``, numbered from 1, after ``after``."""
        return await self._outputs(task_id, after)

    async def preview(self, task_id: str) -> Result | None:
        """The latest preview image a running or finished task reported, if any."""
        return await self._preview(task_id)

    async def counts(self) -> dict[tuple[str, str], int]:
        """``{(route, status): n}`` for the active states, for metrics and readiness."""
        return await self._counts()

    async def finished_counts(self) -> dict[tuple[str, str], int]:
        """``{(route, status): n}``: tasks that reached each terminal state since the store was made.

        Counted by the store in the same write that ends the task, so the figures cover every
        worker and API process, and survive restarts and the retention purge (Prometheus counters).
        """
        return await self._finished_counts()

    async def longest_waits(self, routes: Sequence[str]) -> dict[str, float]:
        """``{route: seconds}``: how long the longest-waiting due task of each route has waited.

        Measured from when the task fell due (its ``run_at``: its submit, or the end of its
        retry delay), by the store's clock. A route with no due task is left out. The store
        looks at the first task of each priority level only (``WAIT_LEVELS`` of them at most),
        so this stays a few index reads whatever the length of the queue.
        """
        return await self._longest_waits(list(routes))

    # Last in the class: below this, ``list`` names the method, not the builtin type.
    async def list(
        self,
        route: str | None = None,
        status: TaskStatus | str | None = None,
        tag: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        owner: str | None = None,
    ) -> tuple[list[TaskRecord], str | None]:
        """Tasks newest first (finished ones too, until purged), a page at a time.

        Args:
            route: only this route's tasks.
            status: only tasks in this state.
            tag: ``"KEY:VALUE"``, only tasks so labelled. No index covers tags: a page looks at
                no more than ``TAG_WINDOW`` of the newest tasks the other filters select, and
                may come back short, with a cursor to look further. On Redis a status filter
                is bounded the same way (its index is by age alone); on SQLite it is indexed.
            limit: the most tasks a page holds.
            cursor: ``next_cursor`` of the page before.
            owner: only the tasks of this API key owner (``None``: everyone's). Read through a
                per-owner index; a route or status filter on top looks at no more than
                ``TAG_WINDOW`` of the owner's newest tasks per page.

        Returns:
            The page, and the cursor of the next one (``None`` at the end). Task ids are
            ordered by creation time and the cursor is the last id looked at, so paging
            neither repeats nor skips a task while others are submitted.

        Example:
            >>> page, cursor = await queue.list(route="/gen", status="failure", limit=20)
        """
        limit = max(1, min(int(limit), 1000))
        state = None if status is None else TaskStatus(status).value
        if tag is None:
            return await self._list(route, state, limit, cursor, owner)
        key, _, value = tag.partition(":")
        found: list[TaskRecord] = []
        looked = 0
        while looked < TAG_WINDOW:
            page, cursor = await self._list(route, state, min(max(limit * 4, 200), TAG_WINDOW - looked), cursor, owner)
            looked += len(page)
            for record in page:
                if record.tags.get(key) == value:
                    found.append(record)
                    if len(found) == limit:
                        # Continue right after the last task handed out, so none is skipped.
                        more = record is not page[-1] or cursor is not None
                        return found, record.id if more else None
            if cursor is None:
                return found, None
        return found, cursor
