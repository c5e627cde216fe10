"""Prometheus metrics of one API process, in a registry of its own (one per app)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from ..queue.base import Queue

# The families the workers keep (taskserve/worker/metrics.py): name, type, help.
WORKER_FAMILIES = (
    ("taskserve_task_queue_seconds", "histogram", "Seconds from when a task fell due to the start of its call."),
    ("taskserve_task_run_seconds", "histogram", "Seconds one attempt of a task ran."),
    ("taskserve_task_batch_size", "histogram", "Items in each call of a batchable endpoint."),
    ("taskserve_task_outcomes", "counter", "Tasks ended by a worker, by status and error type."),
    ("taskserve_task_retries", "counter", "Failed attempts for which an automatic retry was scheduled, by error type."),
    ("taskserve_workers_alive", "gauge", "Worker processes running."),
)


class WorkersCollector:
    """The workers' metrics from their multiprocess directory, every family named even before its first sample.

    prometheus-client writes a labelled metric only once a worker observes it, so without this a
    scrape before the first retry (or the first task) would not name ``taskserve_task_retries_total``
    at all, and a dashboard or alert written against it would see an unknown metric, not a zero.
    """

    def __init__(self, path: str) -> None:
        self.inner = MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        seen = set()
        for family in self.inner.collect():  # type: ignore[no-untyped-call]
            seen.add(family.name)
            yield family
        for name, kind, documentation in WORKER_FAMILIES:
            if name not in seen:
                family = Metric(name, documentation, kind)
                if kind == "gauge":  # unlabelled: no worker has started yet, so none is alive
                    family.add_sample(name, {}, 0.0)
                yield family


def register_workers(registry: CollectorRegistry, path: str) -> None:
    """Serve, through ``registry``, the metrics the workers keep in ``path``."""
    registry.register(WorkersCollector(path))


class _FinishedTasks:
    """``taskserve_tasks_finished_total`` from the store's own tallies, read at each scrape.

    The API process never sees a queued task end (a worker ends it, maybe on another host),
    so the count comes from the store, which adds to it in the write that ends each task.
    """

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.counts: dict[tuple[str, str], int] = {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "taskserve_tasks_finished",
            "Tasks that reached a terminal state (success, failure, cancelled), over all workers and API servers.",
            labels=["endpoint", "status"],
        )
        for (route, status), n in sorted(self.counts.items()):
            family.add_metric([self.names.get(route, route), status], n)
        yield family


class Metrics:
    """The API's own metrics, plus those its local workers keep in ``workers_dir`` (multiprocess mode).

    Workers on other hosts serve theirs themselves (``taskserve worker --metrics-port``).
    """

    def __init__(self, names: dict[str, str] | None = None, workers_dir: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self.finished_tasks = _FinishedTasks(names or {})
        self.registry.register(self.finished_tasks)
        if workers_dir is not None:
            register_workers(self.registry, workers_dir)
        self.submitted = Counter(
            "taskserve_tasks_submitted", "Tasks accepted into the queue.", ["endpoint"], registry=self.registry
        )
        self.webhooks = Counter(
            "taskserve_webhook_deliveries",
            "Tries of webhook deliveries made by this API process, by outcome (delivered, retry, failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.finished = Counter(
            "taskserve_direct_calls",
            "Outcomes of direct calls (POST /{route}) answered by this API process.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "taskserve_submit_seconds",
            "Time to validate and durably store a submitted task.",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.active = Gauge(
            "taskserve_queue_tasks",
            "Tasks queued or running, by endpoint route.",
            ["route", "status"],
            registry=self.registry,
        )
        self.up = Gauge("taskserve_queue_up", "1 if the broker answered the last scrape.", registry=self.registry)

    async def render(self, queue: Queue, routes: list[str]) -> bytes:
        try:
            counts = await queue.counts()
            self.finished_tasks.counts = await queue.finished_counts()
            self.up.set(1)
        except Exception:
            counts = None
            self.up.set(0)
        if counts is not None:
            for route in routes:
                for status in ("pending", "in_progress"):
                    self.active.labels(route, status).set(counts.get((route, status), 0))
        return generate_latest(self.registry)
