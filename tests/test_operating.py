"""Operating a service (SPEC §9): GET /tasks, GET /queues, on both brokers."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from .conftest import ROOT, SERVICE, Server, ServerFactory, validate_openapi, wait_until


def submit(server: Server, route: str, body: dict[str, object], **params: str) -> str:
    response = httpx.post(f"{server.url}{route}/submit", json=body, params=params, timeout=10)
    response.raise_for_status()
    task_id: str = response.json()["task_id"]
    return task_id


def listing(server: Server, **params: object) -> httpx.Response:
    return httpx.get(f"{server.url}/tasks", params=params, timeout=10)  # type: ignore[arg-type]


def test_tasks_are_listed_newest_first_with_filters(served: Server) -> None:
    tag = f"run:{uuid.uuid4().hex}"
    ids = [submit(served, "/echo", {"text": str(i)}, tag=tag) for i in range(3)]
    failed = submit(served, "/fail", {"message": "no"}, tag=tag)
    wait_until(lambda: listing(served, tag=tag, status="failure").json()["tasks"])
    body = listing(served, tag=tag).json()
    assert [t["task_id"] for t in body["tasks"]] == [failed, *reversed(ids)]
    assert body["tasks"][0]["route"] == "/fail" and body["tasks"][0]["tags"] == {"run": tag.split(":")[1]}
    assert [t["task_id"] for t in listing(served, tag=tag, route="echo").json()["tasks"]] == ids[::-1]
    assert [t["task_id"] for t in listing(served, tag=tag, status="failure").json()["tasks"]] == [failed]


def test_a_failed_attempt_keeps_its_traceback_and_the_arguments_are_served(served: Server) -> None:
    task_id = submit(served, "/fail", {"message": "bad input"})
    wait_until(lambda: httpx.get(f"{served.url}/tasks/{task_id}", timeout=10).json()["status"] == "failure")
    [error] = httpx.get(f"{served.url}/tasks/{task_id}", timeout=10).json()["errors"]
    assert error["type"] == "ValueError" and error["message"] == "bad input"
    # From the task's own code on: the worker's frames above it are left out.
    assert error["traceback"].startswith("Traceback") and "services.py" in error["traceback"]
    assert "in fail" in error["traceback"] and "taskserve/worker" not in error["traceback"]
    assert httpx.get(f"{served.url}/tasks/{task_id}/arguments", timeout=10).json() == {"message": "bad input"}
    assert httpx.get(f"{served.url}/tasks/{'0' * 32}/arguments", timeout=10).status_code == 404


@pytest.mark.parametrize(
    ("params", "parameter"),
    [({"status": "done"}, "status"), ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"), ({"limit": "x"}, "limit")]
    + [({"tag": "nocolon"}, "tag"), ({"tag": ":v"}, "tag"), ({"cursor": "garbage"}, "cursor")]
    + [({"statuss": "failure"}, "statuss")],
)
def test_bad_listing_parameters_are_answered_422_naming_them(
    served: Server, params: dict[str, str], parameter: str
) -> None:
    response = listing(served, **params)
    assert response.status_code == 422
    assert response.json()["parameter"] == parameter and parameter in response.json()["error"]


def test_paging_neither_skips_nor_repeats_while_tasks_are_submitted(served: Server) -> None:
    tag = f"page:{uuid.uuid4().hex}"
    before = {submit(served, "/echo", {"text": "x"}, tag=tag) for _ in range(25)}
    stop = threading.Event()
    added: list[str] = []

    def keep_submitting() -> None:
        while not stop.is_set():
            added.append(submit(served, "/echo", {"text": "y"}, tag=tag))

    thread = threading.Thread(target=keep_submitting)
    thread.start()
    try:
        seen: list[str] = []
        cursor = None
        while True:
            page = listing(served, tag=tag, limit=4, **({"cursor": cursor} if cursor else {})).json()
            seen += [t["task_id"] for t in page["tasks"]]
            time.sleep(0.01)
            cursor = page["next_cursor"]
            if cursor is None:
                break
    finally:
        stop.set()
        thread.join()
    assert len(seen) == len(set(seen))
    assert before <= set(seen)
    assert added, "no task was submitted while paging"


def test_queues_say_what_waits_and_how_long(make_server: ServerFactory, broker: str) -> None:
    server = make_server(broker, workers=0)
    for _ in range(3):
        submit(server, "/echo", {"text": "wait"})
    time.sleep(1.2)
    queues = {q["route"]: q for q in httpx.get(f"{server.url}/queues", timeout=10).json()["queues"]}
    echo = queues["/echo"]
    assert echo["counts"]["pending"] == 3 and echo["running"] == 0 and echo["workers"] == 0
    assert echo["oldest_pending_age"] >= 1.0
    assert queues["/capped"]["concurrency"] == 2 and queues["/bounded"]["max_queue"] == 3
    assert queues["/add"]["oldest_pending_age"] is None


def test_queues_count_what_finished_in_the_last_minute(served: Server) -> None:
    before = {q["route"]: q for q in httpx.get(f"{served.url}/queues", timeout=10).json()["queues"]}["/add"]
    ids = [submit(served, "/add", {"a": i}) for i in range(4)]
    wait_until(lambda: all(httpx.get(f"{served.url}/tasks/{i}").json()["status"] == "success" for i in ids))
    after = {q["route"]: q for q in httpx.get(f"{served.url}/queues", timeout=10).json()["queues"]}["/add"]
    assert after["counts"]["success"] == before["counts"]["success"] + 4
    assert after["finished_last_minute"] >= before["finished_last_minute"] + 4


def json_lines(text: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    return lines


def test_serve_logs_json_lines_with_the_failures_traceback(make_server: ServerFactory, broker: str) -> None:
    server = make_server(broker, "--log-format", "json")
    task_id = submit(server, "/fail", {"message": "broken on purpose"})
    wait_until(lambda: httpx.get(f"{server.url}/tasks/{task_id}").json()["status"] == "failure")
    server.stop()
    lines = json_lines(server.log.read_text())
    (failure,) = [line for line in lines if task_id in str(line["message"])]
    assert failure["level"] == "warning" and "broken on purpose" in str(failure["traceback"])
    assert "Traceback (most recent call last)" in str(failure["traceback"])
    assert any(line["logger"] == "taskserve" for line in lines)


def test_worker_logs_json_lines(make_server: ServerFactory, broker: str, tmp_path: Path) -> None:
    server = make_server(broker, workers=0)
    log = tmp_path / "worker.log"
    args = [sys.executable, "-m", "taskserve", "worker", SERVICE, "--broker", broker, "--log-format", "json"]
    with log.open("wb") as out:
        worker = subprocess.Popen(args, cwd=ROOT, env=server.env, stdout=out, stderr=subprocess.STDOUT)
    server.extra.append(worker)
    task_id = submit(server, "/fail", {"message": "worker failure"})
    wait_until(lambda: httpx.get(f"{server.url}/tasks/{task_id}").json()["status"] == "failure")
    worker.send_signal(signal.SIGTERM)
    worker.wait(30)
    lines = json_lines(log.read_text())
    assert any("worker failure" in str(line.get("traceback")) for line in lines)


def test_the_openapi_document_describes_listing_and_queues() -> None:

    from taskserve.server.openapi import openapi_document
    from taskserve.service import load_service

    docs = openapi_document(load_service(SERVICE))  # what /docs.json serves (tests/test_http.py checks that)
    validate_openapi(docs)
    listing = docs["paths"]["/tasks"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {"route", "status", "tag", "limit", "cursor"}
    assert "422" in listing["responses"] and "/queues" in docs["paths"]


@pytest.mark.anyio
async def test_longest_waits_look_past_priorities_and_ignore_tasks_not_due(broker: str) -> None:
    from taskserve._types import NewTask
    from taskserve.queue import Queue

    queue = Queue.from_url(broker)
    try:
        assert await queue.longest_waits(["/w"]) == {}
        await queue.enqueue(NewTask("/w", b"{}", priority=0))
        await asyncio.sleep(0.3)
        await queue.enqueue(NewTask("/w", b"{}", priority=5))
        await queue.enqueue(NewTask("/w", b"{}", run_at=time.time() + 60))
        waits = await queue.longest_waits(["/w", "/other"])
        assert set(waits) == {"/w"} and 0.3 <= waits["/w"] < 5
        [claim] = await queue.claim(["/w"], "w1")  # the priority-5 task
        assert (await queue.longest_waits(["/w"]))["/w"] >= 0.3
        await queue.claim(["/w"], "w1")
        assert await queue.longest_waits(["/w"]) == {}
    finally:
        await queue.close()
