"""Whether anyone serves the routes: /readyz, /workers, a task that waits with no worker, direct calls.

A worker started against another store (the classic mistake: a relative SQLite path used
from two working directories) must be visible, not a task pending for ever in silence.
"""

from __future__ import annotations

import re
import time

import httpx

from .conftest import Server, ServerFactory, wait_until


def metric(server: Server, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(selector)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_readyz_counts_ready_workers_per_route(broker: str, make_server: ServerFactory) -> None:
    server = make_server(broker, workers=2)
    # Ready once one worker serves each route; the second may come a moment later.
    body = wait_until(
        lambda: (
            (r := httpx.get(f"{server.url}/readyz")).status_code == 200
            and r.json()["workers"]["/echo"] == 2
            and r.json()
        )
    )
    assert body["status"] == "ready"
    assert body["workers"]["/describe"] == 2
    workers = httpx.get(f"{server.url}/workers").json()["workers"]
    assert sorted(w["pid"] for w in workers) == sorted(body["worker_pids"])
    assert all(w["state"] == "ready" and "/echo" in w["routes"] for w in workers)


def test_with_no_worker_readyz_says_so_and_a_waiting_task_warns(broker: str, make_server: ServerFactory) -> None:
    api = make_server(broker, workers=0)
    r = httpx.get(f"{api.url}/readyz")
    assert r.status_code == 503
    assert r.json()["status"] == "no_workers" and r.json()["workers"]["/echo"] == 0
    assert "/echo" in r.json()["error"]
    task_id = httpx.post(f"{api.url}/echo/submit", json={"text": "x"}).json()["task_id"]
    status = httpx.get(f"{api.url}/echo/status", params={"task_id": task_id}).json()
    assert status["status"] == "pending" and status["workers"] == 0
    assert "No worker is serving /echo" in status["warning"]


def test_a_direct_call_with_no_worker_answers_503_and_cancels_its_task(broker: str, make_server: ServerFactory) -> None:
    api = make_server(broker, workers=0)
    began = time.monotonic()
    r = httpx.post(f"{api.url}/describe", json={"text": "anyone?"}, timeout=60)
    assert r.status_code == 503
    assert "No worker is serving /describe" in r.json()["error"]
    assert time.monotonic() - began < 30
    assert metric(api, "taskserve_tasks_finished_total", endpoint="describe", status="cancelled") == 1


def test_a_direct_call_is_bounded_and_cancels_what_it_gave_up_on(broker: str, make_server: ServerFactory) -> None:
    server = make_server(broker, "--call-timeout", "1", workers=1)
    r = httpx.post(f"{server.url}/slow_async", json={"seconds": 30}, timeout=60)
    assert r.status_code == 504
    assert "did not finish within 1s" in r.json()["error"]
    status = httpx.get(f"{server.url}/slow_async/status", params={"task_id": r.json()["task_id"]}).json()
    assert status["status"] == "cancelled"


def test_finished_counter_counts_queued_tasks_from_every_worker(broker: str, make_server: ServerFactory) -> None:
    server = make_server(broker, workers=1)
    client = server.client()
    before = metric(server, "taskserve_tasks_finished_total", endpoint="add", status="success")
    tasks = client.add.submit_many([{"a": i} for i in range(3)])
    assert [t.get(timeout=20) for t in tasks] == [1, 2, 3]
    failed = client.fail.submit(message="x")
    failed.wait(timeout=20)
    assert metric(server, "taskserve_tasks_finished_total", endpoint="add", status="success") == before + 3
    assert metric(server, "taskserve_tasks_finished_total", endpoint="fail", status="failure") >= 1
