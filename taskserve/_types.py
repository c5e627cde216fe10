"""Plain data that crosses process boundaries: task records, claims and outcomes.

Every queue backend speaks in these types, so the server, the workers and the tests never
see a backend's own row or hash layout.
"""

from __future__ import annotations

import enum
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


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


def new_task_id() -> str:
    """A time-ordered id (48 bits of milliseconds, 80 random bits), like a UUIDv7.

    Ordered ids keep B-tree inserts at the right edge of the index, so submit stays fast at
    millions of stored tasks; the random part makes them unguessable and collision-free.
    """
    ms = int(time.time() * 1000) & ((1 << 48) - 1)
    return f"{ms:012x}{os.urandom(10).hex()}"


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class NewTask:
    """What a submit hands to the queue: the validated, JSON-encoded arguments and options.

    ``priority``, ``run_at`` and ``group`` are stored and honoured in claim order so that
    priorities, delays and per-route concurrency caps can be added without a schema change.
    """

    route: str
    args: bytes
    max_attempts: int = 1
    timeout: float | None = None
    priority: int = 0
    run_at: float | None = None
    id: str = field(default_factory=new_task_id)


@dataclass
class TaskRecord:
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
        }


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
