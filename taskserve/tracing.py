"""OpenTelemetry tracing (``pip install taskserve[otel]``): one trace from the submit to the worker's run.

The submit's span context travels with the task, stored beside it as W3C trace headers
(``traceparent``, ``tracestate``) in JSON, so the worker's span, on any host and however
long the task waited, joins the caller's trace. Without opentelemetry installed, or with no
tracer provider set up, every function here returns at once: nothing is stored or started.
opentelemetry is not even imported unless somebody else did (no provider can be set up
without it): a worker that does not trace starts no slower.

A process sets up the SDK from the standard ``OTEL_*`` variables (``configure``) unless a
provider is already there (``opentelemetry-instrument``, or the application's own).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._types import Outcome
    from .worker.execute import Running

logger = logging.getLogger("taskserve")

_tracer: tuple[Any, Any] = (None, None)  # (provider, its tracer): get_tracer builds a new one per call


def tracer() -> Any:
    """The taskserve tracer of the configured provider, or None while none is (tracing off)."""
    global _tracer
    trace: Any = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if provider is _tracer[0]:
        return _tracer[1]
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    from . import __version__

    _tracer = (provider, provider.get_tracer("taskserve", __version__))
    return _tracer[1]


@contextlib.contextmanager
def submit_span(endpoint: str, headers: Mapping[str, str]) -> Iterator[str | None]:
    """A span around one submit, in the caller's trace if its request carries one; yields what to store."""
    t = tracer()
    if t is None:
        yield None
        return
    from opentelemetry import propagate, trace

    parent = propagate.extract(headers)
    with t.start_as_current_span(f"submit {endpoint}", context=parent, kind=trace.SpanKind.PRODUCER) as span:
        span.set_attribute("taskserve.endpoint", endpoint)
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        yield json.dumps(carrier, separators=(",", ":")) if carrier else None


def start_runs(runnings: Sequence[Running]) -> Any:
    """One span per task about to run, each a child of its submit's; None when tracing is off.

    A task run alone has its span made current, so spans its own code starts nest under it
    (a sync call's thread gets the context with the call).
    """
    t = tracer()
    if t is None:
        return None
    from opentelemetry import context as otel_context, propagate, trace

    spans = []
    for running in runnings:
        claim = running.claim
        parent = propagate.extract(json.loads(claim.trace)) if claim.trace else None
        span = t.start_span(
            f"run {running.endpoint.name}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "taskserve.endpoint": running.endpoint.name,
                "taskserve.task_id": claim.id,
                "taskserve.attempt": claim.attempts,
            },
        )
        spans.append(span)
    token = otel_context.attach(trace.set_span_in_context(spans[0])) if len(spans) == 1 else None
    return spans, token


def end_runs(started: Any, outcomes: Sequence[Outcome | None]) -> None:
    if started is None:
        return
    from opentelemetry import context as otel_context, trace

    from ._types import Outcome, TaskStatus

    spans, token = started
    if token is not None:
        otel_context.detach(token)
    for span, outcome in zip(spans, outcomes, strict=True):
        if isinstance(outcome, Outcome):
            span.set_attribute("taskserve.status", outcome.status.value)
            if outcome.status is TaskStatus.FAILURE:
                span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.error))
        span.end()


def configure() -> None:
    """Set up the SDK from the ``OTEL_*`` variables, once tracing is asked for and nobody else did.

    Asked for means ``OTEL_TRACES_EXPORTER`` or an OTLP endpoint is set; exporters are found
    by name as the SDK's own auto-configuration finds them (``console`` comes with the SDK,
    ``otlp`` with ``opentelemetry-exporter-otlp``).
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    names = os.environ.get("OTEL_TRACES_EXPORTER")
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if names is None and not any(os.environ.get(k) for k in endpoints):
        return
    try:
        from opentelemetry import trace
    except ImportError:
        logger.warning("OTEL_* variables are set but opentelemetry is not installed: pip install 'taskserve[otel]'")
        return
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return  # opentelemetry-instrument, or the application, set one up already
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logger.warning("OTEL_* variables are set but opentelemetry-sdk is not installed: pip install 'taskserve[otel]'")
        return
    from importlib.metadata import entry_points

    named = "OTEL_SERVICE_NAME" in os.environ or "service.name" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(resource=Resource.create({} if named else {"service.name": "taskserve"}))
    for name in (n.strip() for n in (names or "otlp").split(",")):
        if name in ("", "none"):
            continue
        found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
        if not found:
            logger.warning("OTEL_TRACES_EXPORTER names %r, which no installed package provides; skipping it", name)
            continue
        provider.add_span_processor(BatchSpanProcessor(found[0].load()()))
    trace.set_tracer_provider(provider)
