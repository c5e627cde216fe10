"""Prometheus metrics of one API process, in a registry of its own (one per app)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from ..queue.base import Queue


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
            MultiProcessCollector(self.registry, path=workers_dir)  # type: ignore[no-untyped-call]
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
