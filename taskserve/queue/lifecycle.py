"""The task state machine: every rule of how a task changes state after it was claimed.

A task is ``pending`` until a worker claims it, ``in_progress`` while one holds it, and then
``success``, ``failure`` or ``cancelled`` for good. Which of these a task moves to, and
under what conditions, is decided here and nowhere else::

    pending ──claim──▶ in_progress ──success────────────────▶ success
       ▲                  │   │  └──failure, no retry or none left▶ failure
       │                  │   └────cancel (also from pending)─▶ cancelled
       └──── released ────┤  (handed back unstarted at shutdown: the attempt is given back)
       └──── retry ───────┤  (failure with retry asked and attempts left, after its delay)
       └──── lost ────────┘  (lease lapsed with attempts left; none left: failure, WorkerLost)
    pending ──ttl ran out──▶ failure (Expired)      pending or in_progress ──deadline──▶ failure

A decision is a list of ``Move``\\ s, tried in order: the first whose guards hold is applied,
atomically, by the backend (``SQLiteQueue._move`` in SQL, ``move.lua`` on Redis); if none
holds the task is left as it is (another writer got there first). The guards are the only
thing a backend evaluates: the current status, the claim's token (fencing), a lapsed lease
and attempts left. Everything a move does follows from its fields in one generic way on both
backends: a move to ``pending`` puts the task back in the claimable index (due after
``delay`` if set); a move to a terminal status stamps ``completed_at`` and the purge time,
drops the lease, counts it in the finished tallies and wakes whoever waits on the task; a move
out of ``in_progress`` that is not fenced by a token (a cancel) tells the holder to stop.
Every status change appends a ``status`` event with the move's ``reason``.

Claiming stays with the backends: which pending task comes next is a property of their indexes
(priority, then due time, then id), not a rule with alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .._types import WORKER_LOST, Event, Outcome, TaskRecord, TaskStatus, event_id, event_seq, iso, split_error

PENDING, IN_PROGRESS = TaskStatus.PENDING, TaskStatus.IN_PROGRESS


@dataclass(slots=True)
class Move:
    """One candidate transition of one task, applied only if all its guards hold.

    Treated as immutable (``dataclasses.replace`` makes variants); not frozen only because a
    frozen dataclass is slower to build, and one is built per task on the finishing path.
    """

    to: TaskStatus
    # -- guards ---------------------------------------------------------------------------
    held: tuple[TaskStatus, ...] = (IN_PROGRESS,)  # the task must be in one of these states
    token: str | None = None  # ...and held under this claim (None: whoever holds it)
    lapsed: bool = False  # ...and its lease must have run out
    attempts_left: bool = False  # ...and attempts < max_attempts
    # -- effects --------------------------------------------------------------------------
    reason: str | None = None  # why it went back to pending (released, retry, lost), in its event
    delay: float | None = None  # back to pending: due this many seconds from now (None: as it was)
    give_back_attempt: bool = False  # the attempt did not count (handed back unstarted)
    error: tuple[str, str] | None = None  # (type, message), appended to the record's errors
    error_text: str | None = None  # the record's ``error``: the last failure as "Type: message"
    traceback: str | None = None  # kept with the error in the record's errors
    result: bytes | None = None
    content_type: str | None = None
    started_at: float | None = None  # when the call really began (the claim time is kept without)
    batch_size: int | None = None
    # A re-send of this very move (after a lost reply) finds this stamp on the task and reports
    # the move as applied instead of refused: the claim's token, or a cancel request's id.
    stamp: str | None = None

    @property
    def terminal(self) -> bool:
        return self.to.is_terminal

    @property
    def tells_holder(self) -> bool:
        """A move that may take a task from a live holder (a cancel) must tell it to stop."""
        return IN_PROGRESS in self.held and self.token is None and not self.lapsed


def finished(outcome: Outcome) -> list[Move]:
    """What a worker's report for its claim does to the task."""
    o, token = outcome, outcome.token
    if o.status is TaskStatus.SUCCESS:
        success = Move(
            TaskStatus.SUCCESS,
            token=token,
            stamp=token,
            result=o.result,
            content_type=o.content_type,
            started_at=o.started_at,
            batch_size=o.batch_size,
        )
        return [success]
    if o.status is PENDING:  # handed back unstarted (shutdown): as if never claimed
        return [Move(PENDING, token=token, stamp=token, reason="released", give_back_attempt=True)]
    failure = Move(
        TaskStatus.FAILURE,
        token=token,
        stamp=token,
        error=o.error_parts(),
        error_text=o.error,
        traceback=o.traceback,
        started_at=o.started_at,
        batch_size=o.batch_size,
    )
    if not o.retry:
        return [failure]
    retry = replace(failure, to=PENDING, attempts_left=True, reason="retry", delay=max(0.0, o.retry_delay))
    return [retry, failure]


def lost(error: str = WORKER_LOST) -> list[Move]:
    """A lease ran out: the holder died or hung. It runs again while attempts remain."""
    parts = split_error(error)
    return [
        Move(PENDING, lapsed=True, attempts_left=True, reason="lost", error=parts, error_text=error),
        Move(TaskStatus.FAILURE, lapsed=True, error=parts, error_text=error),
    ]


def expired(expires_at: float | None) -> list[Move]:
    """A queue TTL ran out before any worker started the task: it never runs."""
    error = ("Expired", f"not started before its time to live ran out at {iso(expires_at)}")
    return [Move(TaskStatus.FAILURE, held=(PENDING,), error=error, error_text=f"{error[0]}: {error[1]}")]


def deadline_exceeded(deadline: float | None) -> list[Move]:
    """A deadline passed: a pending task never runs, a running one is told to stop."""
    error = ("DeadlineExceeded", f"not finished by its deadline {iso(deadline)}")
    return [Move(TaskStatus.FAILURE, held=(PENDING, IN_PROGRESS), error=error, error_text=f"{error[0]}: {error[1]}")]


def cancelled(request: str) -> list[Move]:
    """A user's cancel: a pending task never runs, a running one is told to stop."""
    return [Move(TaskStatus.CANCELLED, held=(PENDING, IN_PROGRESS), stamp=request)]


def history(record: TaskRecord, stored: list[Event]) -> list[Event]:
    """A task's whole event log: what its row tells, merged with the events stored for it.

    Only what the row cannot tell is stored: an attempt that went back to pending (its
    ``in_progress`` event and the ``pending`` one with the reason), so that claims and ends,
    the hot path, write no event. The rest follows from the row: event 1 is the submit; the
    current attempt, if it was claimed, is an ``in_progress`` event; an ended task adds its
    terminal event. Ids stay stable: an attempt that goes back to pending later is stored under
    the very ids it had as derived events.
    """
    stored = [e for e in stored if event_seq(e.id) > 1]  # the submit, stored by older versions
    events = [Event(event_id(1), "status", {"status": "pending"}, record.created_at), *stored]
    seq = max(event_seq(e.id) for e in events)
    stored_claims = sum(1 for e in stored if e.data.get("status") == "in_progress")
    # A released attempt gave its number back, so claims made = attempts + releases.
    claims = record.attempts + sum(1 for e in stored if e.data.get("reason") == "released")
    if record.status is not PENDING and claims > stored_claims:
        seq += 1
        at = record.started_at if record.started_at is not None else record.created_at
        events.append(Event(event_id(seq), "status", {"status": IN_PROGRESS.value}, at))
    if record.status.is_terminal:
        seq += 1
        at = record.completed_at if record.completed_at is not None else record.created_at
        events.append(Event(event_id(seq), "status", {"status": record.status.value}, at))
    return events
