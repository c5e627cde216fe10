"""Progress and streamed output end to end in one process: a Worker and the app over one queue.

The same contract as tests/test_events.py, run where coverage can see the reporter, the executor's
streaming path and the SSE endpoint (the served tests run them in other processes).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from taskserve.queue import Queue
from taskserve.server import create_app
from taskserve.service import load_service
from taskserve.worker.core import Worker

from .conftest import SERVICE

pytestmark = pytest.mark.anyio


@pytest.fixture
async def setup(broker: str) -> AsyncIterator[tuple[Queue, httpx.AsyncClient]]:
    queue = Queue.from_url(broker)
    await queue.connect()
    app = create_app(load_service(SERVICE), queue, maintenance=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield queue, http
    await queue.close()


async def run_all(queue: Queue) -> None:
    await Worker(load_service(SERVICE), queue, name="w", concurrency=2).run(burst=True)


def parse(body: str) -> list[tuple[str, str, object]]:
    out = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            out.append((fields["id"], fields["event"], json.loads(fields["data"])))
    return out


async def test_generators_progress_and_the_stream_in_one_process(setup: tuple[Queue, httpx.AsyncClient]) -> None:
    queue, http = setup
    sync_id = (await http.post("/tokens/submit", json={"n": 30})).json()["task_id"]
    async_id = (await http.post("/tokens_async/submit", json={"n": 12})).json()["task_id"]
    steps_id = (await http.post("/steps/submit", json={"n": 12, "pause": 0.0})).json()["task_id"]
    await asyncio.wait_for(run_all(queue), 60)
    stream = parse((await http.get("/tokens/events", params={"task_id": sync_id})).text)
    assert [d for _, kind, d in stream if kind == "output"] == [f"t{i}" for i in range(30)]
    assert stream[-1][1] == "status" and stream[-1][2]["status"] == "success"  # type: ignore[index]
    resumed = parse(
        (await http.get("/tokens/events", params={"task_id": sync_id}, headers={"Last-Event-ID": stream[20][0]})).text
    )
    assert [d for _, kind, d in resumed if kind == "output"] == [f"t{i}" for i in range(19, 30)]
    assert (await http.get("/tokens_async/get", params={"task_id": async_id})).json() == [{"i": i} for i in range(12)]
    status = (await http.get("/steps/status", params={"task_id": steps_id})).json()
    assert status["progress"]["fraction"] == 1.0 and status["progress"]["message"] == "step 12/12"
    preview = await http.get("/steps/preview", params={"task_id": steps_id})
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/jpeg"
    bad = await http.get("/tokens/events", params={"task_id": sync_id}, headers={"Last-Event-ID": "nope"})
    assert bad.status_code == 400 and "error" in bad.json()
