"""Prometheus metrics of one API process, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..queue.base import Queue


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.submitted = Counter(
            "taskserve_tasks_submitted", "Tasks accepted into the queue.", ["endpoint"], registry=self.registry
        )
        self.finished = Counter(
            "taskserve_tasks_finished",
            "Outcomes of direct calls (POST /{route}) answered by this API process.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.requests = Counter(
            "taskserve_http_requests",
            "HTTP requests by endpoint and status code.",
            ["path", "code"],
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
            self.up.set(1)
        except Exception:
            counts = None
            self.up.set(0)
        if counts is not None:
            for route in routes:
                for status in ("pending", "in_progress"):
                    self.active.labels(route, status).set(counts.get((route, status), 0))
        return generate_latest(self.registry)
