"""Plain data that crosses process boundaries: task records, claims and outcomes.

Every queue backend speaks in these types, so the server, the workers and the tests never
see a backend's own row or hash layout.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ._splice import SpooledArgs


class TaskStatus(str, enum.Enum):
    """Where a task is in its life: ``pending`` → ``in_progress`` → a terminal state."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    def __str__(self) -> str:
        return self.value


TERMINAL_STATUSES = frozenset({TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.CANCELLED})


_id_lock = threading.Lock()
_last_id = [0, 0]  # the milliseconds and random part of this process's last id


def new_task_id() -> str:
    """A time-ordered id (48 bits of milliseconds, 80 random bits), like a UUIDv7.

    Ordered ids keep B-tree inserts at the right edge of the index, so submit stays fast at
    millions of stored tasks. Within one millisecond a process's ids still increase (the
    random part grows by a random step), so tasks of equal priority submitted one after the
    other are claimed in that order; the random step keeps the next id unguessable.
    """
    ms = int(time.time() * 1000) & ((1 << 48) - 1)
    with _id_lock:
        last_ms, last_rand = _last_id
        if ms <= last_ms:
            ms, rand = last_ms, last_rand + 1 + int.from_bytes(os.urandom(4), "big")
            if rand >= 1 << 80:  # a million ids in one millisecond: borrow the next one
                ms, rand = ms + 1, int.from_bytes(os.urandom(9), "big")
        else:
            rand = int.from_bytes(os.urandom(9), "big")  # 72 bits: room to grow within the ms
        _last_id[:] = [ms, rand]
    return f"{ms:012x}{rand:020x}"


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def split_error(error: str | None) -> tuple[str, str]:
    """``"Type: message"`` as ``(type, message)``: the one place the stored error string is taken apart."""
    if not error:
        return "Error", ""
    kind, sep, message = error.partition(": ")
    if not sep and (" " in kind or not kind):
        return "Error", error
    return kind, message


# Validated arguments: JSON bytes, or, for uploads over a MiB, the same bytes in a file (_splice.py).
Args = bytes | SpooledArgs


def args_hash(args: Args) -> str:
    """What idempotency compares: the same key with other arguments is a conflict."""
    if isinstance(args, SpooledArgs):
        return args.sha256
    return hashlib.sha256(args).hexdigest()


@dataclass
class NewTask:
    """What a submit hands to the queue: the validated, JSON-encoded arguments and options.

    ``priority`` and ``run_at`` are honoured in claim order. ``ttl`` (seconds from ``run_at``)
    or ``expires_at`` bounds the wait to start, ``deadline`` the whole life; ``retry_of``
    names the task a manual retry came from. ``max_queue`` is no field of the task: the
    submit is refused (``QueueFull``) if the route already holds that many pending tasks.
    """

    route: str
    args: Args
    max_attempts: int = 1
    timeout: float | None = None
    priority: int = 0
    run_at: float | None = None
    id: str = field(default_factory=new_task_id)
    tags: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    args_hash: str | None = None
    ttl: float | None = None
    expires_at: float | None = None
    deadline: float | None = None
    retry_of: str | None = None
    webhook: str | None = None
    max_queue: int | None = None
    trace: str | None = None  # the submit's trace context (W3C headers as JSON), for the worker's span
    owner: str | None = None  # the API key's owner that submitted it (None where the server has no keys)

    @property
    def stored_key(self) -> str | None:
        """The idempotency key as the store holds it: scoped by owner, so tenants never share one."""
        return scoped_key(self.owner, self.idempotency_key)


def scoped_key(owner: str | None, key: str | None) -> str | None:
    """``key`` within ``owner``'s namespace; without an owner (a server without keys) the key itself."""
    if key is None or owner is None:
        return key
    return f"{owner}{OWNER_SEP}{key}"


def unscoped_key(stored: str | None) -> str | None:
    """The key the client sent, from its stored form."""
    return None if stored is None else stored.rpartition(OWNER_SEP)[2]


OWNER_SEP = "\x1f"  # between the owner and the key of a stored idempotency key (a control character no key holds)


@dataclass
class TaskRecord:
    """A task as the store holds it (everything but its arguments and result).

    ``error`` is the last failure as ``"Type: message"``; ``errors`` keeps one
    ``{"attempt", "type", "message", "at"}`` per failed attempt (and ``"traceback"`` where the
    task's code raised). ``expires_at`` is the TTL
    deadline (``None`` without a ttl); ``purge_at`` is when retention deletes a
    finished task.
    """

    id: str
    route: str
    status: TaskStatus
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    attempts: int = 0
    max_attempts: int = 1
    error: str | None = None
    worker: str | None = None
    priority: int = 0
    timeout: float | None = None
    run_at: float | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    retry_of: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    progress: dict[str, Any] | None = None
    idempotency_key: str | None = None
    args_hash: str | None = None
    batch_size: int | None = None
    expires_at: float | None = None
    deadline: float | None = None
    purge_at: float | None = None
    webhook: str | None = None
    # The webhook's delivery (taskserve/webhooks.py): None while pending, then "delivered" or
    # "failed"; tries made so far, and the last one's error.
    webhook_state: str | None = None
    webhook_attempts: int = 0
    webhook_error: str | None = None
    # The owner of the API key that submitted it; None when the server had no keys.
    owner: str | None = None
    # Not stored: set on what a submit returns when an idempotency key found an earlier task.
    replayed: bool = False
    # Not stored: for a pending task, how many tasks of its route would be claimed before it.
    position: int | None = None

    @property
    def queue_time(self) -> float | None:
        """Seconds from when the task fell due (``run_at``, the submit unless delayed) to its last start."""
        if self.started_at is None:
            return None
        return max(0.0, self.started_at - (self.run_at if self.run_at is not None else self.created_at))

    @property
    def run_time(self) -> float | None:
        """Seconds the last attempt ran, once the task has ended."""
        if self.started_at is None or self.completed_at is None:
            return None
        return max(0.0, self.completed_at - self.started_at)

    def webhook_json(self) -> dict[str, Any]:
        return {
            "url": self.webhook,
            "state": self.webhook_state or "pending",
            "attempts": self.webhook_attempts,
            "last_error": self.webhook_error,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.id,
            "status": self.status.value,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "completed_at": iso(self.completed_at),
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "error": self.error,
            "worker": self.worker,
            "route": self.route,
            "priority": self.priority,
            "run_at": iso(self.run_at),
            "errors": [{**e, "at": iso(e.get("at"))} for e in self.errors],
            "retry_of": self.retry_of,
            "tags": dict(self.tags),
            "progress": progress_json(self.progress),
            "batch_size": self.batch_size,
            "queue_time": self.queue_time,
            "run_time": self.run_time,
            "expires_at": iso(self.expires_at),
            "deadline": iso(self.deadline),
            "position": self.position,
            "webhook": None if self.webhook is None else self.webhook_json(),
        }


def progress_json(progress: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored progress (its ``at`` in seconds) as the status shows it."""
    if progress is None:
        return None
    return {**progress, "at": iso(progress.get("at"))}


@dataclass
class Event:
    """One entry of a task's append-only event log.

    ``id`` orders the events of one task (as strings and as numbers) and never changes, so a
    reader resumes after the last id it saw (SSE ``Last-Event-ID``). ``kind`` is ``status``
    for now (``data``: the new ``status``, and ``reason`` for a re-queue); ``progress`` and
    ``output`` come later.
    """

    id: str
    kind: str
    data: dict[str, Any]
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "data": self.data, "at": iso(self.at)}


def event_id(seq: int) -> str:
    """The public form of a task's n-th event: zero-padded, so string order is number order."""
    return f"{seq:010d}"


def event_seq(event_id: str | None) -> int:
    if not event_id:
        return 0
    try:
        return int(event_id)
    except ValueError:
        raise ValueError(f"Not an event id: {event_id!r}; pass the id of an event this task reported.") from None


@dataclass
class Claim:
    """A task handed to one worker. ``token`` fences every later write about this attempt.

    ``timeout`` is the task's own limit per attempt (the endpoint's unless the submit set
    one); ``priority`` orders the worker's buffer of claims not started yet.
    """

    id: str
    route: str
    args: bytes
    token: str
    attempts: int
    max_attempts: int
    timeout: float | None
    priority: int = 0
    deadline: float | None = None  # the task's deadline, on the store's clock
    due_at: float | None = None  # when it fell due (submit or end of delay), on the store's clock: queue time
    trace: str | None = None  # the W3C traceparent of the submit, when tracing was on there


@dataclass
class Outcome:
    """What a worker reports for one claimed attempt.

    ``status`` is ``success`` (with ``result``), ``failure`` (with ``error``; ``retry``
    asks for the task to be queued again if attempts remain, after ``retry_delay``), or
    ``pending`` to hand the task back untouched (drain at shutdown).
    """

    id: str
    token: str
    status: TaskStatus
    result: bytes | None = None
    content_type: str | None = None
    error: str | None = None
    retry: bool = False
    retry_delay: float = 0.0
    # When the call really began (seconds since the epoch); the claim time is only when it was taken.
    started_at: float | None = None
    # The failure's type and message apart (they go to the record's ``errors``); if left out they
    # are read from ``error``, and ``error`` is built from them when only they are given.
    error_type: str | None = None
    error_message: str | None = None
    # How many items the call that ran this task held (batchable endpoints).
    batch_size: int | None = None
    # The failure's traceback (the task's own frames), kept with the attempt in ``errors``.
    traceback: str | None = None

    def __post_init__(self) -> None:
        if self.error is None and self.error_type is not None:
            self.error = f"{self.error_type}: {self.error_message}" if self.error_message else self.error_type

    def error_parts(self) -> tuple[str, str]:
        if self.error_type is not None:
            return self.error_type, self.error_message or ""
        return split_error(self.error)


@dataclass
class WorkerInfo:
    """One worker process as it reports itself through the store (heartbeats).

    ``state`` is ``starting`` (building the service, e.g. loading a model), ``ready`` or
    ``stopping``. ``last_seen`` is stamped by the store when it takes a heartbeat, so the
    clocks of worker hosts never matter.
    """

    id: str
    host: str
    pid: int
    routes: list[str]
    concurrency: int
    started_at: float
    state: str = "starting"
    last_seen: float = 0.0
    running: list[str] = field(default_factory=list)
    gpus: list[str] = field(default_factory=list)
    done: int = 0
    failed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "routes": list(self.routes),
            "concurrency": self.concurrency,
            "state": self.state,
            "started_at": iso(self.started_at),
            "last_seen": iso(self.last_seen),
            "running": list(self.running),
            "gpus": list(self.gpus),
            "done": self.done,
            "failed": self.failed,
        }

    def dumps(self) -> str:
        """The stored form (JSON, with raw timestamps)."""
        return json.dumps({**self.to_json(), "started_at": self.started_at, "last_seen": self.last_seen})

    @classmethod
    def loads(cls, data: str | bytes) -> WorkerInfo:
        raw = json.loads(data)
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


@dataclass
class Result:
    body: bytes
    content_type: str


WORKER_LOST = "WorkerLost: the worker running this task stopped renewing its lease (it died or hung)"
