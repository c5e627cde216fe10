"""What a worker process tells Prometheus: queue and run times, batch sizes, outcomes, retries.

Under ``taskserve serve`` (and ``taskserve worker --metrics-port``) the supervisor gives each
worker a private ``PROMETHEUS_MULTIPROC_DIR``; prometheus-client then keeps these values in
files there, which the API's ``/metrics`` (or the metrics port) sums over the workers, dead
ones included. Without it they stay in this process's memory, unread and nearly free.

Everything is observed once per finished call on the worker's loop, from what the worker
already holds (the claim's due time, the outcome): nothing more is written to the store.
"""

from __future__ import annotations

from collections.abc import Sequence

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


class RouteMetrics:
    """One endpoint's labelled children, looked up once rather than per task."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.queue = QUEUE_SECONDS.labels(endpoint)
        self.run = RUN_SECONDS.labels(endpoint)
        self.batch = BATCH_SIZE.labels(endpoint)
        self.success = OUTCOMES.labels(endpoint, "success", "")


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
        m.success.inc()
        return
    error_type = outcome.error_parts()[0]
    claim = running.claim
    if outcome.retry and claim.attempts < claim.max_attempts:
        RETRIES.labels(m.endpoint, error_type).inc()
    else:
        OUTCOMES.labels(m.endpoint, "failure", error_type).inc()


def worker_started() -> None:
    WORKERS_ALIVE.inc()


def worker_stopped() -> None:
    WORKERS_ALIVE.dec()


def mark_dead(pid: int, path: str) -> None:
    """Drop a dead worker's live gauges from the shared directory (its counters stay, as they should)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
