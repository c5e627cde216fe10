"""Durability, crash recovery, cancel and drain, with processes really killed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio
import httpx
import pytest

import taskserve

from .conftest import ServerFactory, assert_none_left, wait_until, worker_pid

pytestmark = pytest.mark.slow


def status(url: str, route: str, task_id: str) -> dict:
    return dict(httpx.get(f"{url}/{route}/status", params={"task_id": task_id}).json())


def started(marker: Path) -> bool:
    return marker.exists() and "started" in marker.read_text()


def test_a_worker_killed_mid_task_is_replaced_and_the_task_runs_again(
    broker: str, make_server: ServerFactory, tmp_path: Path
) -> None:
    server = make_server(broker, workers=1)
    client = server.client()
    marker = tmp_path / "marker"
    task = client.slow_sync.submit(seconds=1.5, marker=str(marker))
    wait_until(lambda: started(marker))
    victim = worker_pid(server.url, task.status()["worker"])
    os.kill(victim, signal.SIGKILL)
    assert task.wait(timeout=40).value == "success"
    info = task.status()
    assert info["attempts"] >= 2
    assert task.get()["pid"] != victim
    assert marker.read_text().count("started") >= 2
    server.stop()
    assert_none_left(server.tag)


def test_killing_everything_loses_no_accepted_task_nor_result(
    broker: str, make_server: ServerFactory, tmp_path: Path
) -> None:
    server = make_server(broker, workers=1)
    client = server.client()
    done = client.add.submit(a=1, b=2)
    assert done.wait(timeout=20).value == "success"
    running = client.slow_sync.submit(seconds=30, marker=str(tmp_path / "m"))
    wait_until(lambda: running.get_status().value == "in_progress")
    queued = [client.add.submit(a=i) for i in range(5)]
    server.kill_all()
    assert_none_left(server.tag)

    # Enough slots that the re-run of the 30 s task does not hold up the others.
    again = make_server(broker, "--concurrency", "4", workers=1, port=server.port)
    client = again.client()
    assert client.add.task(done.id).get() == 3
    for i, task in enumerate(queued):
        assert client.add.task(task.id).get(timeout=30) == i + 1
    # The task that was running when the machine died runs again once its lease lapses.
    assert client.slow_sync.task(running.id).get_status().value in ("pending", "in_progress")
    client.slow_sync.task(running.id).cancel()


@pytest.mark.anyio
async def test_500_concurrent_submits_each_run_once_with_its_own_result(
    broker: str, make_server: ServerFactory, tmp_path: Path
) -> None:
    server = make_server(broker, "--concurrency", "4", workers=2)
    log = tmp_path / "runs.log"
    limit = anyio.Semaphore(50)
    ids: dict[int, str] = {}

    async with taskserve.AsyncHTTPClient(server.url) as client:

        async def one(x: int) -> None:
            async with limit:
                ids[x] = (await client.record.submit(x=x, log=str(log))).id

        async with anyio.create_task_group() as tg:
            for x in range(500):
                tg.start_soon(one, x)
        assert len(set(ids.values())) == 500
        for x, task_id in ids.items():
            assert await client.record.task(task_id).get(timeout=60) == x * 2
    runs = log.read_text().split()
    assert sorted(map(int, runs)) == list(range(500))  # each ran exactly once


def test_cancel_a_pending_task_and_it_never_runs(broker: str, make_server: ServerFactory, tmp_path: Path) -> None:
    server = make_server(broker, workers=1)
    client = server.client()
    blocker = client.slow_async.submit(seconds=1.5, marker=str(tmp_path / "blocker"))
    wait_until(lambda: started(tmp_path / "blocker"))
    never = tmp_path / "never"
    task = client.slow_async.submit(seconds=0, marker=str(never))
    assert task.cancel().value == "cancelled"
    assert blocker.wait(timeout=20).value == "success"
    after = client.echo.submit(text="after")  # the worker is free and has looked at the queue again
    assert after.get(timeout=20) == "after"
    assert task.get_status().value == "cancelled"
    assert not never.exists()
    with pytest.raises(taskserve.TaskCancelled):
        task.get()


@pytest.mark.parametrize("route", ["slow_async", "slow_sync"])
def test_cancel_a_running_task_stops_it(broker: str, make_server: ServerFactory, tmp_path: Path, route: str) -> None:
    server = make_server(broker, workers=1)
    client = server.client()
    marker = tmp_path / "marker"
    task = getattr(client, route).submit(seconds=30, marker=str(marker))
    wait_until(lambda: started(marker))
    assert task.cancel().value == "cancelled"
    # The single worker is free again long before the 30 s task would have ended.
    assert client.echo.submit(text="next").get(timeout=10) == "next"
    assert task.get_status().value == "cancelled"
    assert "finished" not in marker.read_text()


def test_sigterm_drains_running_tasks_and_hands_back_the_rest(
    broker: str, make_server: ServerFactory, tmp_path: Path
) -> None:
    server = make_server(broker, "--grace", "1", workers=1)
    client = server.client()
    quick, slow = tmp_path / "quick", tmp_path / "slow"
    short = client.slow_async.submit(seconds=0.5, marker=str(quick))
    wait_until(lambda: started(quick))
    long = client.slow_async.submit(seconds=30, marker=str(slow))
    assert short.wait(timeout=20).value == "success"
    wait_until(lambda: started(slow))
    server.stop()  # SIGTERM: the long task outlives the 1 s grace and goes back to the queue
    assert server.proc is not None and server.proc.returncode == 0

    again = make_server(broker, "--workers", "0", workers=0)
    record = status(again.url, "slow_async", long.id)
    assert record["status"] == "pending"
    assert record["attempts"] == 0


def test_finished_tasks_expire_after_the_retention_time(broker: str, make_server: ServerFactory) -> None:
    server = make_server(broker, "--retention", "1", workers=1)
    client = server.client()
    task = client.echo.submit(text="short-lived")
    assert task.get(timeout=20) == "short-lived"
    wait_until(lambda: httpx.get(f"{server.url}/echo/status", params={"task_id": task.id}).status_code == 404, 10)


def test_a_worker_started_alone_serves_an_api_only_server(
    broker: str, make_server: ServerFactory, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from .conftest import ROOT, SERVICE

    api = make_server(broker, workers=0)
    task = api.client().add.submit(a=2, b=2)
    time.sleep(0.3)
    assert task.get_status().value == "pending"  # nobody to run it yet
    worker = subprocess.Popen(
        [sys.executable, "-m", "taskserve", "worker", SERVICE, "--broker", broker, "--concurrency", "2"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api.extra.append(worker)
    assert task.get(timeout=30) == 4
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0


def test_unreachable_broker_gives_503_and_the_server_stays_up(make_server: ServerFactory) -> None:
    server = make_server("redis://127.0.0.1:1/0", workers=0, start=False)
    server.start_no_wait()
    wait_until(lambda: _answers(server.url), 20)
    r = httpx.post(f"{server.url}/echo/submit", json={"text": "x"}, timeout=30)
    assert r.status_code == 503
    assert "redis" in r.json()["error"].lower()
    assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 503
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_slow_tasks_after_many_quick_ones_are_shared_by_idle_workers(broker: str, make_server: ServerFactory) -> None:
    server = make_server(broker, workers=2)
    client = server.client()
    for i in range(60):  # long enough for both workers to learn that `add` is quick
        assert client.add.submit(a=i).get(timeout=20) == i + 1
    slow = client.slow_async.submit_many([{"seconds": 0.4}] * 6)
    for task in slow:
        assert task.get(timeout=30) == "slept"
    # Nobody claimed the slow ones ahead: both workers ran some.
    assert len({task.status()["worker"] for task in slow}) == 2


def test_time_limits_keys_and_delays_survive_kill_9_of_every_process(broker: str, make_server: ServerFactory) -> None:
    """SPEC §7 under a crash: a TTL and a deadline fire once any process is back, a delayed task
    is neither lost nor run early, and an idempotency key still finds its task."""
    server = make_server(broker, workers=0)
    url = server.url
    expiring = httpx.post(f"{url}/add/submit", params={"ttl": "1"}, json={"a": 1}).json()["task_id"]
    bounded = httpx.post(f"{url}/add/submit", headers={"Cancel-After": "1"}, json={"a": 2}).json()["task_id"]
    delayed = httpx.post(f"{url}/add/submit", params={"delay": "3"}, json={"a": 3}).json()["task_id"]
    keyed = httpx.post(f"{url}/add/submit", headers={"Idempotency-Key": "k-1"}, json={"a": 4}).json()["task_id"]
    delayed_due = status(url, "add", delayed)["run_at"]
    server.kill()  # SIGKILL; it has no workers
    time.sleep(1.2)  # the TTL and the deadline pass while nothing runs
    again = make_server(broker, workers=1, port=server.port)
    replay = httpx.post(f"{url}/add/submit", headers={"Idempotency-Key": "k-1"}, json={"a": 4})
    assert replay.json()["task_id"] == keyed and replay.headers["idempotent-replayed"] == "true"
    client = again.client()
    for task_id, kind in ((expiring, "Expired"), (bounded, "DeadlineExceeded")):
        assert client.add.task(task_id).wait(timeout=20).value == "failure"
        info = status(url, "add", task_id)
        assert info["errors"][-1]["type"] == kind and info["started_at"] is None
    assert client.add.task(delayed).get(timeout=30) == 4
    assert status(url, "add", delayed)["started_at"] >= delayed_due  # ISO 8601 in UTC sorts as time
    assert client.add.task(keyed).get(timeout=30) == 5


def test_a_concurrency_cap_holds_while_workers_die(broker: str, make_server: ServerFactory) -> None:
    """Three workers of two slots; the route's cap is two. Killing a worker mid-run frees its slot
    when its lease goes, and the cap held over every attempt that finished."""
    server = make_server(broker, "--concurrency", "2", workers=3)
    client = server.client()
    tasks = [client.capped.submit(seconds=0.6) for _ in range(8)]
    wait_until(lambda: any(t.get_status().value == "in_progress" for t in tasks))
    running = next(t for t in tasks if t.get_status().value == "in_progress")
    os.kill(worker_pid(server.url, running.status()["worker"]), signal.SIGKILL)
    assert [t.get(timeout=60) for t in tasks] == ["done"] * 8
    spans = [(s["started_at"], s["completed_at"]) for s in (t.status() for t in tasks)]
    assert max(sum(1 for s, e in spans if s <= moment < e) for moment, _ in spans) <= 2, spans


def test_a_stream_resumed_across_kill_9_of_every_process_loses_and_repeats_no_item(
    broker: str, make_server: ServerFactory
) -> None:
    """The API process and the worker die mid-stream; after a restart the task runs again and a
    stream resumed with the last event id it saw continues exactly after that item."""
    server = make_server(broker, workers=1)
    task_id = httpx.post(f"{server.url}/tokens/submit", json={"n": 60, "pause": 0.05}).json()["task_id"]
    seen: list[str] = []
    last = ""
    with httpx.stream("GET", f"{server.url}/tokens/events", params={"task_id": task_id}, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("id: "):
                last = line[4:]
            elif line.startswith("data: ") and line[6:].startswith('"t'):
                seen.append(line[6:].strip('"'))
                if len(seen) == 10:
                    break
    server.kill_all()
    again = make_server(broker, workers=1, port=server.port)
    client = again.client()
    rest = [
        e.data
        for e in _resume(client, task_id, last)  # the new attempt writes over the same item numbers
        if e.kind == "output"
    ]
    assert seen + rest == [f"t{i}" for i in range(60)]
    assert client.tokens.task(task_id).get(timeout=30) == [f"t{i}" for i in range(60)]


def _resume(client: taskserve.SyncHTTPClient, task_id: str, last: str) -> list:
    """The events after ``last``, read as a client resuming with Last-Event-ID does."""
    from taskserve.client._base import SSEParser

    events = []
    url = f"{client.url}/tokens/events"
    with httpx.stream("GET", url, params={"task_id": task_id}, headers={"Last-Event-ID": last}, timeout=60) as r:
        parser = SSEParser()
        for line in r.iter_lines():
            event = parser.feed(line)
            if event is not None:
                events.append(event)
                if event.final:
                    break
    return events
