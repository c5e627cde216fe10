"""Many machines on one Redis: API servers and workers started separately, as on other hosts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from .conftest import (
    ROOT,
    SERVICE,
    RedisServer,
    ServerFactory,
    assert_none_left,
    die_with_parent,
    tagged_env,
    wait_until,
    worker_pid,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def start_workers(broker: str, *options: str, tag: str = "") -> subprocess.Popen[bytes]:
    """``taskserve worker`` as an operator would start it on a worker host; ``tag`` marks its processes."""
    args = [sys.executable, "-m", "taskserve", "worker", SERVICE, "--broker", broker, "--lease", "2", *options]
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=tagged_env(tag or uuid.uuid4().hex),
        preexec_fn=die_with_parent,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_two_api_servers_and_three_workers_share_the_work(redis_broker: str, make_server: ServerFactory) -> None:
    broker = redis_broker
    a, b = make_server(broker, workers=0), make_server(broker, workers=0)
    hosts = [start_workers(broker) for _ in range(3)]
    a.extra.extend(hosts)
    ca, cb = a.client(), b.client()
    tasks = [(ca if i % 2 else cb).slow_async.submit(seconds=0.2) for i in range(18)]
    for task in tasks:  # fetched through the other server than the one it was submitted to
        other = cb if task.endpoint.client is ca else ca
        assert other.slow_async.task(task.id).get(timeout=60) == "slept"
    workers = {cb.slow_async.task(t.id).status()["worker"] for t in tasks}
    assert len(workers) == 3  # every worker host took some
    pending = ca.slow_async.submit(seconds=30)
    wait_until(lambda: pending.get_status().value == "in_progress", 20)
    assert cb.slow_async.task(pending.id).cancel().value == "cancelled"
    assert ca.slow_async.task(pending.id).get_status().value == "cancelled"


def test_a_worker_host_that_dies_mid_task_has_its_task_finished_elsewhere(
    redis_broker: str, make_server: ServerFactory, tmp_path: Path
) -> None:
    broker = redis_broker
    api = make_server(broker, workers=0)
    first_host = uuid.uuid4().hex
    first = start_workers(broker, tag=first_host)
    api.extra.append(first)
    client = api.client()
    marker = tmp_path / "marker"
    task = client.slow_sync.submit(seconds=1.0, marker=str(marker))
    wait_until(lambda: marker.exists(), 30)
    second = start_workers(broker)
    api.extra.append(second)
    dead_pid = worker_pid(api.url, task.status()["worker"])
    os.kill(first.pid, signal.SIGKILL)  # the host's supervisor and its worker go at once
    os.kill(dead_pid, signal.SIGKILL)
    assert_none_left(first_host)
    assert task.wait(timeout=60).value == "success"
    assert task.status()["attempts"] == 2
    assert task.get()["pid"] != dead_pid


def test_everything_accepted_completes_across_a_redis_restart(
    redis_server: RedisServer, make_server: ServerFactory
) -> None:
    server = make_server(redis_server.url, "--concurrency", "4", workers=2)
    client = server.client()
    tasks = [client.slow_async.submit(seconds=0.3) for _ in range(20)]
    redis_server.stop()
    r = httpx.post(f"{server.url}/echo/submit", json={"text": "during the outage"}, timeout=30)
    assert r.status_code == 503 and "error" in r.json()
    time.sleep(1.0)
    redis_server.start()
    for task in tasks:
        assert task.get(timeout=60) == "slept"
    assert client.echo.submit(text="after").get(timeout=30) == "after"
