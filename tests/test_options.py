"""Options of one submission (docs/api.md): priority, delay or run_at, timeout and tags, per task.

Against a real ``taskserve serve`` with workers on each broker, through both clients and raw
HTTP; the refusals also through the in-process app, where the store can be checked to hold
nothing after a refused submit.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import httpx
import pytest

import taskserve
from taskserve.queue import Queue
from taskserve.server import create_app
from taskserve.service import load_service

from .conftest import SERVICE, Server


def parse(ts: str) -> float:
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def test_a_delayed_tagged_task_waits_for_its_time_then_runs(served: Server) -> None:
    with taskserve.SyncHTTPClient(served.url) as client:
        before = time.time()
        task = client.add.options(delay=1.5, tags={"team": "search", "run": "7"}, priority=3).submit(a=1, b=2)
        status = task.status()
        assert status["status"] == "pending" and status["priority"] == 3
        assert status["tags"] == {"team": "search", "run": "7"}
        run_at = parse(status["run_at"])
        assert before + 1.4 <= run_at <= time.time() + 1.6
        assert task.get(timeout=30) == 3
        assert parse(task.status()["started_at"]) >= run_at - 0.01  # not claimed before its time


def test_a_timeout_given_at_submit_stops_that_attempt(served: Server) -> None:
    with taskserve.SyncHTTPClient(served.url) as client:
        task = client.slow_async.options(timeout=0.5).submit(seconds=30)
        assert task.wait(timeout=30) is taskserve.TaskStatus.FAILURE
        assert task.status()["errors"][-1]["type"] == "TimeoutError"
        untimed = client.slow_async.submit(seconds=0.7)  # the option was this task's only
        assert untimed.get(timeout=30) is not None


def test_options_apply_to_every_task_of_submit_many_and_to_a_direct_call(served: Server) -> None:
    answer = httpx.post(
        f"{served.url}/add/submit_many",
        params=[("tag", "batch:nightly"), ("priority", "2")],
        json=[{"a": 1}, {"a": 2}],
    )
    assert answer.status_code == 200, answer.text
    for item in answer.json()["tasks"]:
        status = httpx.get(f"{served.url}/add/status", params={"task_id": item["task_id"]}).json()
        assert status["tags"] == {"batch": "nightly"} and status["priority"] == 2
    direct = httpx.post(f"{served.url}/slow_async", params={"timeout": "0.5"}, json={"seconds": 30}, timeout=60)
    # Ended by the caller's own timeout option: 409 as get answers, not a server error.
    assert direct.status_code == 409 and "timeout" in direct.json()["error"].lower()


@pytest.mark.anyio
async def test_the_async_client_sends_options_and_run_at(served: Server) -> None:
    async with taskserve.AsyncHTTPClient(served.url) as client:
        when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
        task = await client.echo.options(run_at=when, tags={"k": "v"}).submit(text="later")
        status = await task.status()
        assert abs(parse(status["run_at"]) - when.timestamp()) < 0.01 and status["tags"] == {"k": "v"}
        assert await task.get(timeout=30) == "later"
        results = [r async for r in client.echo.options(priority=1).map(["a", "b"])]
        assert results == ["a", "b"]


@pytest.mark.anyio
async def test_bad_options_are_refused_by_name_and_queue_nothing(tmp_path: Path) -> None:
    queue = Queue.from_url(f"sqlite:///{tmp_path}/tasks.db")
    await queue.connect()
    app = create_app(load_service(SERVICE), queue, maintenance=False)
    cases = [
        ({"priority": "high"}, "priority"),
        ({"priority": "10000000"}, "priority"),
        ({"delay": "-1"}, "delay"),
        ({"delay": "nan"}, "delay"),
        ({"run_at": "tomorrow"}, "run_at"),
        ({"timeout": "0"}, "timeout"),
        ({"tag": "no-colon"}, "tag"),
        ({"prio": "1"}, "prio"),
    ]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        for params, name in cases:
            for path, body in (("/add/submit", {"a": 1}), ("/add/submit_many", [{"a": 1}]), ("/add", {"a": 1})):
                answer = await http.post(path, params=params, json=body)
                assert answer.status_code == 422, (params, path, answer.text)
                assert ["query", name] in [d["loc"] for d in answer.json()["detail"]], answer.json()
                assert name in answer.json()["error"]
        many_tags = [("tag", f"k{i}:v") for i in range(33)]
        assert (await http.post("/add/submit", params=many_tags, json={"a": 1})).status_code == 422
        twice = await http.post("/add/submit", params=[("tag", "k:1"), ("tag", "k:2")], json={"a": 1})
        assert twice.status_code == 422 and "twice" in twice.json()["error"]
        listed, _ = await queue.list(limit=10)
        assert listed == []
        past = await http.post("/add/submit", params={"run_at": "2020-01-01T00:00:00"}, json={"a": 1})
        assert past.status_code == 200  # a time already past means now
    await queue.close()


def test_the_client_refuses_an_option_it_does_not_know(served: Server) -> None:
    with taskserve.SyncHTTPClient(served.url) as client, pytest.raises(TypeError):
        client.add.options(prio=1)


def test_any_task_by_id_alone_on_each_broker(served: Server) -> None:
    with taskserve.SyncHTTPClient(served.url) as client:
        task = client.echo.options(tags={"where": "tasks"}).submit(text="x")
        assert task.get(timeout=30) == "x"
    status = httpx.get(f"{served.url}/tasks/{task.id}").json()
    assert status["task_id"] == task.id and status["route"] == "/echo" and status["tags"] == {"where": "tasks"}
    assert httpx.get(f"{served.url}/tasks/0123").status_code == 404
