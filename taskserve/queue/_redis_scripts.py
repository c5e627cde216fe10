"""The Redis queue's Lua scripts, and how a task's values travel to and from them.

Apart from the queue class because these are the two ends of one wire format: the scripts
(``lua/*.lua``, read once at import) and the Python that encodes the moves ``move.lua``
interprets and decodes the hash fields the scripts store, which must change together.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Sequence
from typing import Any

from .._types import TaskRecord, TaskStatus, unscoped_key
from . import lifecycle

RECORD_FIELDS = tuple(
    "route status created_at started_at completed_at attempts max_attempts error worker priority timeout run_at"
    " errors retry_of tags progress idempotency_key args_hash batch_size expires_at deadline purge_at webhook"
    " webhook_state webhook_attempts webhook_error owner".split()
)

# The Lua lives in lua/*.lua, read once at import; each script is the prelude plus its body.
SCRIPT_NAMES = (
    *("enqueue", "claim", "move", "extend", "lapsed", "counts", "heartbeat", "workers", "list", "sweep"),
    *("overdue", "position", "report", "webhooks", "waits"),
)


def _load_scripts() -> dict[str, str]:
    lua = importlib.resources.files(__package__) / "lua"
    prelude = (lua / "prelude.lua").read_text()
    return {name: prelude + (lua / f"{name}.lua").read_text() for name in SCRIPT_NAMES}


SCRIPTS = _load_scripts()


def move_args(task_id: str, moves: list[lifecycle.Move], ts: float) -> list[Any]:
    """A task's moves as ``move.lua`` reads them: id, the result bytes, the moves as JSON."""
    result, encoded = b"", []
    for m in moves:
        fields: dict[str, Any] = {"to": m.to.value, "held": [s.value for s in m.held]}
        optional = {
            "token": m.token,
            "lapsed": m.lapsed or None,
            "left": m.attempts_left or None,
            "reason": m.reason,
            "delay": m.delay,
            "give": m.give_back_attempt or None,
            "etext": m.error_text,
            "ctype": m.content_type,
            # The start travels as an age by this host's clock; the script subtracts it from Redis's now.
            "age": None if m.started_at is None else max(0.0, ts - m.started_at),
            "batch": m.batch_size,
            "stamp": m.stamp,
            "tell": m.tells_holder or None,
        }
        fields.update((k, v) for k, v in optional.items() if v is not None)
        if m.error is not None:
            fields["etype"], fields["emsg"] = m.error
            if m.traceback is not None:
                fields["etb"] = m.traceback
        if m.result is not None:
            fields["result"], result = True, m.result
        encoded.append(fields)
    return [task_id, result, json.dumps(encoded)]


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)


def decode_record(task_id: str, values: Sequence[Any]) -> TaskRecord | None:
    """A hash written before a field existed reads back with that field's default."""
    (route, status, created, started, completed, attempts, max_attempts, error, worker, priority, timeout, run_at,
     errors, retry_of, tags, progress, key, args_hash, batch_size, expires_at, deadline, purge_at, webhook,
     webhook_state, webhook_attempts, webhook_error, owner) = (
        None if v is None else v.decode() for v in values
    )  # fmt: skip
    if route is None or status is None or created is None:
        return None
    return TaskRecord(
        id=task_id,
        route=route,
        status=TaskStatus(status),
        created_at=float(created),
        started_at=None if started is None else float(started),
        completed_at=None if completed is None else float(completed),
        attempts=int(attempts or 0),
        max_attempts=int(max_attempts or 1),
        error=error,
        worker=worker,
        priority=int(priority or 0),
        timeout=_float(timeout),
        run_at=_float(run_at),
        errors=[] if errors is None else json.loads(errors),
        retry_of=retry_of,
        tags={} if tags is None else json.loads(tags),
        progress=None if progress is None else json.loads(progress),
        idempotency_key=unscoped_key(key),
        args_hash=args_hash,
        batch_size=None if batch_size is None else int(batch_size),
        expires_at=_float(expires_at),
        deadline=_float(deadline),
        purge_at=_float(purge_at),
        webhook=webhook,
        webhook_state=webhook_state,
        webhook_attempts=int(webhook_attempts or 0),
        webhook_error=webhook_error,
        owner=owner,
    )
