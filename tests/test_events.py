"""Watching a task live (SPEC §8): progress with previews, generator tasks' output, the SSE
stream with Last-Event-ID, and the clients' ``events()`` and ``wait(on_progress=...)``.

Against a real ``taskserve serve`` with workers, on each broker.
"""

from __future__ import annotations

import io
import json

import httpx
import pytest
from PIL import Image

import taskserve

from .conftest import Server, ServerFactory, wait_until


def read_stream(
    url: str, params: dict[str, str], headers: dict[str, str] | None = None
) -> list[tuple[str, str, object]]:
    """Every (id, event, data) of one SSE response, until the server ends it."""
    out, kind, ident, data = [], "message", "", []
    with httpx.stream("GET", url, params=params, headers=headers or {}, timeout=30) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":") or line.startswith("retry:"):
                continue
            if not line:
                if data:
                    out.append((ident, kind, json.loads("\n".join(data))))
                kind, data = "message", []
                continue
            name, _, value = line.partition(": ")
            if name == "event":
                kind = value
            elif name == "id":
                ident = value
            elif name == "data":
                data.append(value)
    return out


def test_progress_is_in_the_status_while_the_task_runs_and_its_last_call_stays(served: Server) -> None:
    with taskserve.SyncHTTPClient(served.url) as client:
        task = client.steps.submit(n=60, pause=0.05)
        seen: list[float] = []

        def midway() -> bool:
            progress = task.status()["progress"]
            if progress is not None:
                seen.append(progress["fraction"])
            return bool(seen) and 0 < seen[-1] < 1

        wait_until(midway, 20)
        preview = httpx.get(f"{served.url}/steps/preview", params={"task_id": task.id})
        assert preview.status_code == 200 and preview.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(preview.content)).size == (16, 16)
        assert task.get(timeout=30) == "done"
        final = task.status()["progress"]
    assert final["fraction"] == 1.0 and final["message"] == "step 60/60"
    assert final["preview"] == f"/steps/preview?task_id={task.id}" and final["at"].endswith("Z")


def test_wait_calls_on_progress_with_each_new_progress(served: Server) -> None:
    with taskserve.SyncHTTPClient(served.url) as client:
        task = client.steps_async.submit(n=30, pause=0.05)
        reports: list[dict[str, object]] = []
        assert task.wait(timeout=30, on_progress=reports.append) is taskserve.TaskStatus.SUCCESS
    fractions = [r["fraction"] for r in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 2


def test_a_task_reporting_ten_thousand_times_finishes_with_its_last_report(served: Server) -> None:
    with taskserve.SyncHTTPClient(served.url) as client:
        task = client.steps.submit(n=10_000, pause=0)
        assert task.get(timeout=60) == "done"
        assert task.status()["progress"]["message"] == "step 10000/10000"


@pytest.mark.parametrize("route", ["tokens", "tokens_async"])
def test_a_generator_streams_its_items_in_order_and_stores_their_list(served: Server, route: str) -> None:
    with taskserve.SyncHTTPClient(served.url) as client:
        task = getattr(client, route).submit(n=25, pause=0.01)
        events = list(task.events())
        result = task.get()
    outputs = [e.data for e in events if e.kind == "output"]
    expected = [f"t{i}" for i in range(25)] if route == "tokens" else [{"i": i} for i in range(25)]
    assert outputs == expected and result == expected
    kinds = [e.kind for e in events]
    assert kinds[-1] == "status" and events[-1].data["status"] == "success"
    assert kinds.index("output") > kinds.index("status")  # the run started before its first item


def test_a_resumed_stream_loses_and_repeats_no_output(served: Server) -> None:
    answer = httpx.post(f"{served.url}/tokens/submit", json={"n": 40, "pause": 0.02})
    task_id = answer.json()["task_id"]
    first = read_stream(f"{served.url}/tokens/events", {"task_id": task_id})
    cut = [i for i, (_, kind, _) in enumerate(first) if kind == "output"][9]  # reconnect after the 10th item
    resumed = read_stream(f"{served.url}/tokens/events", {"task_id": task_id}, {"Last-Event-ID": first[cut][0]})
    before = [data for _, kind, data in first[: cut + 1] if kind == "output"]
    after = [data for _, kind, data in resumed if kind == "output"]
    assert before + after == [f"t{i}" for i in range(40)]
    assert resumed[-1][1] == "status" and resumed[-1][2]["status"] == "success"  # type: ignore[index]


@pytest.mark.anyio
async def test_the_async_client_follows_events_and_progress(served: Server) -> None:
    async with taskserve.AsyncHTTPClient(served.url) as client:
        task = await client.tokens_async.submit(n=10)
        outputs = [e.data async for e in task.events() if e.kind == "output"]
        assert outputs == [{"i": i} for i in range(10)]
        steps = await client.steps_async.submit(n=20, pause=0.05)
        fractions: list[float] = []

        async def note(progress: dict[str, float]) -> None:
            fractions.append(progress["fraction"])

        assert await steps.wait(timeout=30, on_progress=note) is taskserve.TaskStatus.SUCCESS
        assert fractions[-1] == 1.0


def test_cancel_stops_a_generator_and_ends_its_stream(served: Server) -> None:
    with taskserve.SyncHTTPClient(served.url) as client:
        task = client.tokens.submit(n=100_000, pause=0.02)
        outputs = 0
        for event in task.events():
            if event.kind == "output":
                outputs += 1
                if outputs == 5:
                    task.cancel()
        assert event.final and event.data["status"] == "cancelled"
        assert 5 <= outputs < 1000


def test_stream_errors_are_json(served: Server) -> None:
    missing = httpx.get(f"{served.url}/tokens/events", params={"task_id": "nope"})
    assert missing.status_code == 404 and "error" in missing.json()
    task_id = httpx.post(f"{served.url}/tokens/submit", json={"n": 1}).json()["task_id"]
    bad = httpx.get(f"{served.url}/tokens/events", params={"task_id": task_id}, headers={"Last-Event-ID": "x.y"})
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["error"]
    none = httpx.get(f"{served.url}/tokens/preview", params={"task_id": task_id})
    assert none.status_code == 404 and "preview" in none.json()["error"]


def test_progress_outside_a_task_says_where_it_works() -> None:
    with pytest.raises(RuntimeError, match="inside a task"):
        taskserve.progress(0.5)


def test_a_stream_resumed_after_the_end_says_the_end_again_and_closes(served: Server) -> None:
    task_id = httpx.post(f"{served.url}/tokens/submit", json={"n": 3}).json()["task_id"]
    whole = read_stream(f"{served.url}/tokens/events", {"task_id": task_id})
    last_id = whole[-1][0]
    again = read_stream(f"{served.url}/tokens/events", {"task_id": task_id}, {"Last-Event-ID": last_id})
    assert [(kind, data["status"]) for _, kind, data in again] == [("status", "success")]  # type: ignore[index]


def test_any_api_server_streams_any_task_on_redis(redis_broker: str, make_server: ServerFactory) -> None:
    """Submitted through one API server, followed through another that runs no worker."""
    worker_side = make_server(redis_broker, workers=1)
    other = make_server(redis_broker, workers=0)
    task_id = httpx.post(f"{worker_side.url}/tokens/submit", json={"n": 20, "pause": 0.02}).json()["task_id"]
    events = read_stream(f"{other.url}/tokens/events", {"task_id": task_id})
    assert [data for _, kind, data in events if kind == "output"] == [f"t{i}" for i in range(20)]
    assert events[-1][1] == "status" and events[-1][2]["status"] == "success"  # type: ignore[index]
