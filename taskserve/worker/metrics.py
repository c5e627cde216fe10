"""What a worker process tells Prometheus: queue and run times, batch sizes, outcomes, retries.

Under ``taskserve serve`` (and ``taskserve worker --metrics-port``) the supervisor gives each
worker a private ``PROMETHEUS_MULTIPROC_DIR``; prometheus-client then keeps these values in
files there, which the API's ``/metrics`` (or the metrics port) sums over the workers, dead
ones included. Without it they stay in this process's memory, unread and nearly free.

Everything is observed on the worker's loop, from what the worker already holds (the claim's
due time, the outcome): nothing more is written to the store. A prometheus-client observation
costs a few microseconds (a lock and, in multiprocess mode, a write to a mapped file), which a
flood of millisecond tasks would feel, so the common ones are tallied here in plain Python and
handed over (``flush``) when the worker writes its outcomes to the store: before the store
says a task ended, its metrics are readable.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from .._types import Outcome, TaskStatus
from .execute import Running

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

QUEUE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
RUN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

QUEUE_SECONDS = Histogram(
    "taskserve_task_queue_seconds",
    "Seconds from when a task fell due (its submit, or the end of its delay) to the start of its call.",
    ["endpoint"],
    buckets=QUEUE_BUCKETS,
)
RUN_SECONDS = Histogram(
    "taskserve_task_run_seconds",
    "Seconds one attempt of a task ran, from the start of its call to its outcome.",
    ["endpoint"],
    buckets=RUN_BUCKETS,
)
BATCH_SIZE = Histogram(
    "taskserve_task_batch_size",
    "Items in each call of a batchable endpoint.",
    ["endpoint"],
    buckets=BATCH_BUCKETS,
)
OUTCOMES = Counter(
    "taskserve_task_outcomes",
    "Tasks ended by a worker: success, failure (with its error type) or cancelled while running.",
    ["endpoint", "status", "error_type"],
)
RETRIES = Counter(
    "taskserve_task_retries",
    "Failed attempts for which an automatic retry was scheduled, by error type.",
    ["endpoint", "error_type"],
)
# livesum: a dead worker's value drops out once the supervisor marks its pid dead.
WORKERS_ALIVE = Gauge("taskserve_workers_alive", "Worker processes running.", multiprocess_mode="livesum")


class _Tally:
    """Observations of one labelled histogram not handed over yet.

    Uses the child's internals (``_upper_bounds``, ``_buckets`` holding per-bucket counts,
    ``_sum``), stable since prometheus-client 0.4: there is no public way to add many at once.
    """

    __slots__ = ("buckets", "bounds", "counts", "sum", "n", "total")

    def __init__(self, child: Any) -> None:
        self.bounds: list[float] = list(child._upper_bounds)
        self.buckets = child._buckets
        self.total = child._sum
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket with value <= its bound
        self.sum += value
        self.n += 1

    def flush(self) -> None:
        if not self.n:
            return
        for i, count in enumerate(self.counts):
            if count:
                self.buckets[i].inc(count)
                self.counts[i] = 0
        self.total.inc(self.sum)
        self.sum, self.n = 0.0, 0


class RouteMetrics:
    """One endpoint's labelled children, looked up once rather than per task, and its tallies."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.queue = _Tally(QUEUE_SECONDS.labels(endpoint))
        self.run = _Tally(RUN_SECONDS.labels(endpoint))
        self.batch = _Tally(BATCH_SIZE.labels(endpoint))
        self._success = OUTCOMES.labels(endpoint, "success", "")
        self.success = 0

    def flush(self) -> None:
        self.queue.flush()
        self.run.flush()
        self.batch.flush()
        if self.success:
            self._success.inc(self.success)
            self.success = 0


_routes: dict[str, RouteMetrics] = {}


def _for(endpoint: str) -> RouteMetrics:
    found = _routes.get(endpoint)
    if found is None:
        found = _routes[endpoint] = RouteMetrics(endpoint)
    return found


def observe(runnings: Sequence[Running], outcomes: Sequence[Outcome | None], ended: float) -> None:
    """Record the calls that just ended; ``ended`` is the wall-clock time they ended at."""
    if not runnings:
        return
    m = _for(runnings[0].endpoint.name)
    calls: set[tuple[float, int]] = set()
    for running, outcome in zip(runnings, outcomes, strict=True):
        if running.started_at is not None and isinstance(outcome, Outcome) and outcome.status is not TaskStatus.PENDING:
            due = running.claim.due_at
            if due is not None:
                m.queue.observe(max(0.0, running.started_at - due))
            m.run.observe(max(0.0, ended - running.started_at))
            if running.batch_size is not None:
                calls.add((running.started_at, running.batch_size))
        _count(m, running, outcome)
    for _, size in calls:  # one observation per call, not per task in it
        m.batch.observe(size)


def _count(m: RouteMetrics, running: Running, outcome: Outcome | None) -> None:
    if outcome is None:
        if running.stop_reason == "cancelled":
            OUTCOMES.labels(m.endpoint, "cancelled", "").inc()
        return
    if not isinstance(outcome, Outcome) or outcome.status is TaskStatus.PENDING:
        return  # handed back, or left for later: not an outcome yet
    if outcome.status is TaskStatus.SUCCESS:
        m.success += 1
        return
    error_type = outcome.error_parts()[0]
    claim = running.claim
    if outcome.retry and claim.attempts < claim.max_attempts:
        RETRIES.labels(m.endpoint, error_type).inc()
    else:
        OUTCOMES.labels(m.endpoint, "failure", error_type).inc()


def flush() -> None:
    """Hand what was tallied over to prometheus-client (see the module's docstring)."""
    for m in _routes.values():
        m.flush()


def worker_started() -> None:
    WORKERS_ALIVE.inc()


def worker_stopped() -> None:
    WORKERS_ALIVE.dec()


def mark_dead(pid: int, path: str) -> None:
    """Drop a dead worker's live gauges from the shared directory (its counters stay, as they should)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
