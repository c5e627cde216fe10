"""The queue interface every broker implements.

Public methods hold the rules (states, fencing, timestamps, retention); backends implement
the underscore methods, each of which must be atomic in the store itself, because API
servers and workers in other processes and on other hosts share it.

Shaped for what comes later: ``claim`` takes a ``limit`` (batching claims several tasks of a
route at once), tasks carry ``priority`` and ``run_at`` (priorities, delays), and claim is
given the routes to serve, so a per-route concurrency cap only narrows that list.

The hooks themselves are declared in ``_backend.py`` and the read-only methods live in
``_reads.py``; ``Queue`` inherits both, so this module holds the rules that change a task.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, urlparse

from .._splice import SPLICE_AT, SpooledArgs, close_all
from .._types import (
    WORKER_LOST,
    Args,
    Claim,
    NewTask,
    Outcome,
    TaskRecord,
    TaskStatus,
    WorkerInfo,
    args_hash,
)
from ..exceptions import InvalidTransition, TaskNotFound
from . import lifecycle
from ._backend import Watch as Watch
from ._reads import TAG_WINDOW as TAG_WINDOW, Reads

DEFAULT_RETENTION = 24 * 3600.0
DEFAULT_LEASE = 30.0
WAIT_LEVELS = 16  # priority levels longest_waits() looks at per route

BACKENDS = {
    "sqlite": "taskserve.queue.sqlite:SQLiteQueue",
    "redis": "taskserve.queue.redis:RedisQueue",
    "rediss": "taskserve.queue.redis:RedisQueue",
}


def now() -> float:
    return time.time()


def queue_full_message(route: str, pending: int, cap: int, new: int) -> str:
    more = "" if new == 1 else f" and this submit holds {new}"
    return (
        f"The queue of {route} is full: {pending} pending task(s){more}, at most {cap} (max_queue). "
        "Nothing was queued; try again after Retry-After seconds."
    )


class Queue(Reads):
    """A durable queue of tasks shared by API servers and workers.

    Args:
        url: the broker URL this queue was opened with.
        retention: seconds a finished task and its result are kept.
    """

    def __init__(self, url: str, *, retention: float = DEFAULT_RETENTION) -> None:
        self.url = url
        self.retention = retention
        # Longest sleep between two reads of a task someone waits on. Backends that push
        # changes raise it, since the poll is then only a safety net.
        self.poll_cap = 0.25
        # Called with a task id when the backend learns that a task was cancelled, so a
        # worker can stop it at once instead of at its next lease renewal.
        self.cancel_listeners: list[Callable[[str], None]] = []
        # ``{route: N}``: claims never let more than N tasks of the route run at once, counted
        # over every worker sharing the store (a worker sets the caps of the routes it serves).
        self.caps: dict[str, int] = {}

    @staticmethod
    def from_url(url: str, **options: Any) -> Queue:
        """Open the queue a broker URL names, importing its backend only now.

        Example:
            >>> queue = Queue.from_url("sqlite:///tasks.db")
        """
        scheme = urlparse(url).scheme
        if scheme not in BACKENDS:
            raise ValueError(f"Unsupported broker URL {url!r}: use sqlite:///path/tasks.db or redis://host:6379/0.")
        module_name, _, attr = BACKENDS[scheme].partition(":")
        import importlib

        cls = getattr(importlib.import_module(module_name), attr)
        query = {k: v[-1] for k, v in parse_qs(urlparse(url).query).items()}
        if "retention" in query and "retention" not in options:
            options["retention"] = float(query["retention"])
        queue: Queue = cls(url, **options)
        return queue

    def describe(self) -> str:
        """The URL with any password hidden, for logs."""
        parsed = urlparse(self.url)
        if parsed.password:
            return self.url.replace(f":{parsed.password}@", ":***@")
        return self.url

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        """Raise ``QueueUnavailable`` unless the store answers."""
        await self._ping()

    def local_dirs(self) -> list[tuple[str, str]]:
        """Directories of this machine the store writes to, each with what it is (for disk checks)."""
        return []

    # -- producer side ---------------------------------------------------------------------

    async def enqueue(self, task: NewTask) -> TaskRecord:
        """Store one task durably; returns once it is committed."""
        return (await self.enqueue_many([task]))[0]

    async def enqueue_many(self, tasks: Sequence[NewTask]) -> list[TaskRecord]:
        """Store all the tasks or none of them.

        A task whose ``idempotency_key`` already names a task of its route is not stored: the
        earlier task's record comes back in its place, marked ``replayed`` (with other arguments,
        ``IdempotencyConflict``). A route holding its ``max_queue`` pending tasks refuses the
        lot with ``QueueFull``. Both are decided in the store's write, so racing submits agree.
        """
        try:
            return await self._store(tasks)
        finally:
            close_all(t.args for t in tasks)  # uploads spooled to files: stored, or refused; either way done with

    async def _store(self, tasks: Sequence[NewTask]) -> list[TaskRecord]:
        ts = now()
        keys = [(t.route, t.stored_key) for t in tasks if t.idempotency_key is not None]
        if len(keys) != len(set(keys)):
            raise ValueError("Two tasks of one enqueue_many carry the same idempotency key; give each its own.")
        for task in tasks:
            if task.run_at is None:
                task.run_at = ts
            if task.args_hash is None:
                task.args_hash = args_hash(task.args)
            if task.ttl is not None and task.expires_at is None:
                # Counted from when the task falls due: a delayed task is not "late" before then.
                task.expires_at = max(task.run_at, ts) + task.ttl
        replays = await self._enqueue(tasks, ts)
        records = [
            TaskRecord(
                id=t.id,
                route=t.route,
                status=TaskStatus.PENDING,
                created_at=ts,
                max_attempts=t.max_attempts,
                priority=t.priority,
                timeout=t.timeout,
                run_at=t.run_at,
                retry_of=t.retry_of,
                tags=dict(t.tags),
                idempotency_key=t.idempotency_key,
                args_hash=t.args_hash,
                expires_at=t.expires_at,
                deadline=t.deadline,
                webhook=t.webhook,
                owner=t.owner,
            )
            for t in tasks
        ]
        for i, task_id in (replays or {}).items():
            earlier = await self._get(task_id)
            if earlier is None:  # purged between the insert and this read: its key is free again
                [records[i]] = await self._store([tasks[i]])
                continue
            earlier.replayed = True
            records[i] = earlier
        return records

    async def cancel(self, task_id: str, route: str | None = None, owner: str | None = None) -> TaskRecord:
        """Cancel a pending or running task; ``InvalidTransition`` if it already ended."""
        record = await self.get(task_id, route, owner)
        if record.status.is_terminal:
            raise InvalidTransition(
                f"Task {task_id!r} has already ended ({record.status.value}) and cannot be cancelled.", record.status
            )
        [cancelled] = await self._apply([(task_id, lifecycle.cancelled(os.urandom(8).hex()))], now())
        if not cancelled:  # it finished between our read and our write
            record = await self.get(task_id, route)
            raise InvalidTransition(
                f"Task {task_id!r} has already ended ({record.status.value}) and cannot be cancelled.", record.status
            )
        return await self.get(task_id, route)

    async def retry(
        self,
        task_id: str,
        route: str | None = None,
        args: Args | None = None,
        *,
        max_queue: int | None = None,
        ttl: float | None = None,
        owner: str | None = None,
    ) -> TaskRecord:
        """Submit a new task with the arguments of a finished one (or ``args``); the old one is unchanged.

        The new task keeps the old one's priority, time limit, tags and webhook, and names it
        in ``retry_of``; its deadline is not carried over (a moment in time), its ``ttl`` is
        the route's, and the route's ``max_queue`` bounds it as any submit. It belongs to the
        old task's owner (``owner``, the caller's, must be that one, or ``None`` for an admin).
        """
        record = await self.get(task_id, route, owner)
        if not record.status.is_terminal:
            raise InvalidTransition(
                f"Task {task_id!r} is still {record.status.value}; only a finished task can be retried.",
                record.status,
            )
        if args is None:
            args = await self._get_args(task_id)
            if args is not None and len(args) > SPLICE_AT:
                args = await asyncio.to_thread(SpooledArgs.of, args)  # 100s of MB: not on the loop
        if args is None:
            raise TaskNotFound(task_id)
        new = NewTask(
            route=record.route,
            args=args,
            max_attempts=record.max_attempts,
            timeout=record.timeout,
            priority=record.priority,
            tags=dict(record.tags),
            retry_of=record.id,
            webhook=record.webhook,
            ttl=ttl,
            max_queue=max_queue,
            owner=record.owner,
        )
        return await self.enqueue(new)

    async def position(self, record: TaskRecord) -> int | None:
        """For a pending task, how many tasks of its route would be claimed before it."""
        if record.status is not TaskStatus.PENDING:
            return None
        return await self._position(record, now())

    async def wait(
        self, task_id: str, timeout: float, route: str | None = None, owner: str | None = None
    ) -> TaskRecord:
        """Return the record once the task is terminal or ``timeout`` seconds have passed."""
        deadline = now() + timeout
        watch = self._watch(task_id)  # registered before the read, so no wake-up is missed
        try:
            record = await self.get(task_id, route, owner)
            delay = 0.005
            while not record.status.is_terminal:
                remaining = deadline - now()
                if remaining <= 0:
                    break
                await watch.wait(min(delay, remaining))
                delay = min(delay * 2, self.poll_cap)
                record = await self.get(task_id, route, owner)
            return record
        finally:
            watch.close()

    # -- worker side -----------------------------------------------------------------------

    async def report(
        self,
        task_id: str,
        token: str,
        *,
        progress: str | None = None,
        preview: tuple[bytes, str] | None = None,
        outputs: Sequence[tuple[int, bytes]] = (),
    ) -> bool:
        """Store a running task's latest progress (JSON), preview and output items, in one write.

        Fenced like an outcome: only while ``token``'s claim holds the task. Returns whether it did.
        """
        return await self._report(task_id, token, progress, preview, list(outputs), now())

    async def claim(
        self,
        routes: Sequence[str],
        worker: str,
        *,
        limit: int = 1,
        lease: float = DEFAULT_LEASE,
        min_priority: int | None = None,
    ) -> list[Claim]:
        """Hand up to ``limit`` due tasks of ``routes`` to this worker, each to exactly one worker.

        Claims come highest ``priority`` first, then oldest ``run_at``. With ``min_priority``
        only tasks of at least that priority are taken: a worker holding claims it has not
        started yet asks for more urgent work this way, without taking more of the same.
        """
        if limit <= 0 or not routes:
            return []
        return await self._claim(list(routes), worker, limit, lease, now(), min_priority)

    async def finish(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Record outcomes; each is applied only while its claim still holds the task.

        Returns, per outcome, whether it was applied. A worker that lost its lease (it was
        presumed dead, or the task was cancelled) gets ``False`` and its outcome is dropped.
        """
        if not outcomes:
            return []
        return await self._apply([(o.id, lifecycle.finished(o)) for o in outcomes], now())

    async def finish_and_claim(
        self,
        outcomes: Sequence[Outcome],
        routes: Sequence[str],
        worker: str,
        *,
        limit: int = 1,
        lease: float = DEFAULT_LEASE,
    ) -> list[Claim]:
        """Record outcomes and claim more work in one go (one transaction where the backend can)."""
        if not outcomes:
            return await self.claim(routes, worker, limit=limit, lease=lease)
        if limit <= 0 or not routes:
            await self.finish(outcomes)
            return []
        return await self._finish_and_claim(list(outcomes), list(routes), worker, limit, lease, now())

    async def extend(self, held: dict[str, str], lease: float = DEFAULT_LEASE) -> set[str]:
        """Renew the leases of ``{task_id: token}``; returns the ids this worker still holds."""
        if not held:
            return set()
        return await self._extend(held, lease, now())

    async def still_held(self, held: dict[str, str]) -> set[str]:
        """A read-only check of which ``{task_id: token}`` claims are still in force."""
        if not held:
            return set()
        return await self._still_held(held)

    async def abandon(self, worker: str) -> int:
        """Treat every lease ``worker`` holds as lapsed now (its process is known to be dead)."""
        return await self._recover(worker)

    def listen_for_cancel(self) -> None:
        """Start hearing cancels from other processes (calls ``cancel_listeners``); workers call it once."""

    async def wait_for_work(self, routes: Sequence[str], timeout: float) -> None:
        """Sleep until new work may be due on ``routes`` or ``timeout`` passes."""
        await self._wait_for_work(list(routes), timeout)

    # -- worker registry -------------------------------------------------------------------

    async def heartbeat(self, info: WorkerInfo, ttl: float) -> None:
        """Record that worker ``info.id`` is alive, as ``info`` says, for ``ttl`` seconds.

        The store stamps ``last_seen`` with its own clock. A worker that stops sending
        heartbeats disappears from ``workers()`` once ``ttl`` has passed.
        """
        await self._heartbeat(info, ttl, now())

    async def workers(self) -> list[WorkerInfo]:
        """The live workers of every host sharing this store (heartbeat within its ttl)."""
        return await self._workers(now())

    async def forget_worker(self, worker: str) -> None:
        """Remove a worker from the registry at once (it exited, or is known to be dead)."""
        await self._forget_worker(worker)

    # -- maintenance -----------------------------------------------------------------------

    async def recover(self) -> int:
        """Re-queue tasks whose lease lapsed (their worker died); fail those out of attempts.

        Also ends the tasks whose TTL or deadline has passed (``expire``): whichever process
        runs maintenance does it, so a deadline holds with any API server or worker down.
        """
        return await self._recover(None) + await self.expire()

    async def expire(self) -> int:
        """End pending tasks past their TTL (``Expired``) and tasks past their deadline (``DeadlineExceeded``).

        A running task past its deadline is taken from its worker as a cancel is: the worker
        is told to stop it and anything it reports later is refused.
        """
        ts = now()
        overdue = await self._overdue(ts)
        if not overdue:
            return 0
        items = [
            (task_id, lifecycle.deadline_exceeded(at) if kind == "deadline" else lifecycle.expired(at))
            for task_id, kind, at in overdue
        ]
        return sum(await self._apply(items, ts))

    async def _recover(self, worker: str | None) -> int:
        ts = now()
        ids = await self._lapsed(ts, worker)
        if not ids:
            return 0
        moves = lifecycle.lost(WORKER_LOST)
        return sum(await self._apply([(task_id, moves) for task_id in ids], ts))

    async def purge(self) -> int:
        """Delete finished tasks older than the retention time; returns how many."""
        return await self._purge(now())

    # -- webhook deliveries (sent by taskserve/webhooks.py) --------------------------------

    async def take_webhooks(self, limit: int, lease: float, tries: int) -> list[tuple[str, int]]:
        """Take up to ``limit`` due webhook deliveries for ``lease`` seconds: ``(task_id, attempt)`` each.

        The task record is the outbox: the write that ends a task with a webhook makes its
        delivery due, so no ended task is missed whichever process dies. A delivery whose taker
        died falls due again when its lease lapses; one that has used its ``tries`` so is
        marked failed. ``attempt`` fences the report: only the latest taker's is recorded.
        """
        if limit <= 0:
            return []
        return await self._take_webhooks(limit, lease, tries, now())

    async def webhook_result(self, task_id: str, attempt: int, error: str | None, retry_in: float | None) -> bool:
        """Record one try: delivered (no ``error``), due again in ``retry_in`` seconds, or else failed for good.

        Returns False when the try was no longer the delivery's latest (its lease lapsed and
        another process took it): that one's report counts instead.
        """
        return await self._webhook_result(task_id, attempt, error, retry_in, now())

    # -- for backends ----------------------------------------------------------------------

    def _notify_cancelled(self, task_id: str) -> None:
        for listener in list(self.cancel_listeners):
            listener(task_id)
