"""Tracing (SPEC §9): the worker's span of a task is in the trace of the submit that made it.

The API app and a burst worker in this test's process, on one SQLite file, with the SDK's
in-memory exporter as the global provider (one per process, so it is set up once here).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import taskserve
from taskserve.queue import Queue
from taskserve.server import create_app
from taskserve.service import load_service
from taskserve.worker.core import Worker

from .conftest import ROOT, ServerFactory

pytestmark = pytest.mark.anyio

EXPORTER = InMemorySpanExporter()


class WhileTesting(SimpleSpanProcessor):
    """Exports only during this module's tests: the provider stays for the session (one per process)."""

    on = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.on:
            super().on_end(span)


PROCESSOR = WhileTesting(EXPORTER)


@taskserve.service(name="traced")
class Traced:
    @taskserve.task
    def shout(self, text: str) -> str:
        with trace.get_tracer("user code").start_as_current_span("inside"):
            if text == "boom":
                raise ValueError("no shouting")
            return text.upper()


SERVICE = load_service(f"{__name__}:Traced")


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[Queue]:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(PROCESSOR)
        trace.set_tracer_provider(provider)
    EXPORTER.clear()
    PROCESSOR.on = True
    queue = Queue.from_url(f"sqlite:///{tmp_path}/q.db")
    await queue.connect()
    try:
        yield queue
    finally:
        PROCESSOR.on = False
        EXPORTER.clear()
        await queue.close()


async def submit(queue: Queue, text: str, headers: dict[str, str] | None = None) -> str:
    app = create_app(SERVICE, queue, maintenance=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.post("/shout/submit", json={"text": text}, headers=headers)
    assert r.status_code == 200, r.text
    return str(r.json()["task_id"])


def span(name: str) -> ReadableSpan:
    return next(s for s in EXPORTER.get_finished_spans() if s.name == name)


def parent_id(span: ReadableSpan) -> int:
    assert span.parent is not None
    return span.parent.span_id


async def test_the_run_of_a_task_joins_the_trace_of_its_submit(queue: Queue) -> None:
    with trace.get_tracer("test client").start_as_current_span("client") as client:
        headers: dict[str, str] = {}
        from opentelemetry import propagate

        propagate.inject(headers)
    task_id = await submit(queue, "hi", headers)
    await Worker(SERVICE, queue, name="w").run(burst=True)
    submitted, ran, inside = span("submit shout"), span("run shout"), span("inside")
    trace_id = client.get_span_context().trace_id
    assert submitted.context.trace_id == ran.context.trace_id == inside.context.trace_id == trace_id
    assert parent_id(submitted) == client.get_span_context().span_id
    assert parent_id(ran) == submitted.context.span_id
    assert parent_id(inside) == ran.context.span_id  # the task's own spans nest under its run
    assert dict(ran.attributes or {})["taskserve.task_id"] == task_id
    assert dict(ran.attributes or {})["taskserve.status"] == "success"


async def test_a_failed_run_is_an_error_span_and_a_submit_without_a_caller_starts_a_trace(queue: Queue) -> None:
    await submit(queue, "boom")
    await Worker(SERVICE, queue, name="w").run(burst=True)
    submitted, ran = span("submit shout"), span("run shout")
    assert submitted.parent is None
    assert ran.context.trace_id == submitted.context.trace_id
    assert ran.status.status_code is trace.StatusCode.ERROR
    assert "ValueError: no shouting" in (ran.status.description or "")


def test_taskserve_runs_without_opentelemetry() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import taskserve.server, taskserve.worker, taskserve.tracing as t\n"
        "t.configure()\n"
        "with t.submit_span('e', {}) as stored: assert stored is None\n"
        "assert t.tracer() is None and t.start_runs([]) is None\n"
    )
    env = {"OTEL_TRACES_EXPORTER": "console", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


def test_serve_traces_from_the_otel_variables_across_processes(
    make_server: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")  # the SDK's own exporter: spans as JSON on stdout
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    server = make_server(f"sqlite:///{tmp_path}/t.db")
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    parent = {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
    task_id = httpx.post(f"{server.url}/echo/submit", json={"text": "x"}, headers=parent).json()["task_id"]
    status = httpx.get(f"{server.url}/echo/wait", params={"task_id": task_id, "timeout": 20}, timeout=30).json()
    assert status["status"] == "success"
    server.stop()  # both processes flush their spans on the way out
    spans = re.findall(
        r'"name": "([^"]+)",\n    "context": \{\n        "trace_id": "0x([0-9a-f]+)"', server.log.read_text()
    )
    assert sorted(spans) == [("run echo", trace_id), ("submit echo", trace_id)]
