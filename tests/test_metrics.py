"""What workers tell Prometheus (SPEC §9): through the API's /metrics, or their own port on another host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from taskserve import _runtime

from .conftest import ROOT, SERVICE, TAG, Server, ServerFactory, assert_none_left, free_port, tagged_env, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def run(server: Server, route: str, **args: object) -> str:
    task_id = str(httpx.post(f"{server.url}/{route}/submit", json=args).json()["task_id"])
    r = httpx.get(f"{server.url}/{route}/wait", params={"task_id": task_id, "timeout": 20}, timeout=30)
    assert r.json()["status"] in ("success", "failure"), r.text
    return task_id


def metrics_dirs(broker: str) -> list[str]:
    directory = _runtime.runtime_dir(_runtime.store_key(broker))
    return [n for n in os.listdir(directory) if n.startswith(_runtime.METRICS)] if os.path.isdir(directory) else []


def test_workers_histograms_and_outcomes_show_in_the_api_metrics(
    broker: str, make_server: ServerFactory, tmp_path: Path
) -> None:
    server = make_server(broker, workers=2)
    for text in ("a", "b", "c"):
        run(server, "echo", text=text)
    run(server, "fail", message="boom")
    run(server, "flaky_connection", log=str(tmp_path / "runs"), failures=1)
    samples = scrape(server.url)
    assert value(samples, "taskserve_task_queue_seconds_count", endpoint="echo") == 3
    assert value(samples, "taskserve_task_run_seconds_count", endpoint="echo") == 3
    assert value(samples, "taskserve_task_run_seconds_bucket", endpoint="echo", le="+Inf") == 3
    assert value(samples, "taskserve_task_run_seconds_count", endpoint="flaky_connection") == 2
    assert value(samples, "taskserve_task_outcomes_total", endpoint="echo", status="success", error_type="") == 3
    assert value(samples, "taskserve_task_outcomes_total", endpoint="fail", status="failure", error_type="ValueError")
    assert value(samples, "taskserve_task_retries_total", endpoint="flaky_connection", error_type="ConnectionError")
    assert value(samples, "taskserve_task_outcomes_total", endpoint="flaky_connection", status="success", error_type="")
    assert value(samples, "taskserve_workers_alive") == 2
    assert value(samples, "taskserve_tasks_submitted_total", endpoint="echo") == 3  # the API's own, still there


def test_a_dead_worker_leaves_the_alive_gauge_and_keeps_its_counts(broker: str, make_server: ServerFactory) -> None:
    server = make_server(broker, workers=1)
    run(server, "echo", text="before")
    os.kill(server.worker_pids()[0], signal.SIGKILL)
    wait_until(lambda: value(scrape(server.url), "taskserve_workers_alive") == 0, 10)
    wait_until(lambda: value(scrape(server.url), "taskserve_workers_alive") == 1, 30)  # its replacement
    run(server, "echo", text="after")
    assert value(scrape(server.url), "taskserve_task_queue_seconds_count", endpoint="echo") == 2


def test_the_metrics_directory_goes_with_the_server(broker: str, make_server: ServerFactory) -> None:
    server = make_server(broker, workers=1)
    assert len(metrics_dirs(broker)) == 1
    server.stop()
    assert metrics_dirs(broker) == []
    killed = make_server(broker, workers=1)
    killed.kill_all()
    assert len(metrics_dirs(broker)) == 1  # a kill -9 cannot clean up: the next start sweeps it
    make_server(broker, workers=1).stop()
    assert metrics_dirs(broker) == []


def test_a_worker_on_another_host_serves_its_own_metrics(broker: str, make_server: ServerFactory) -> None:
    api = make_server(broker, workers=0)
    port, env = free_port(), tagged_env(uuid.uuid4().hex)
    args = [sys.executable, "-m", "taskserve", "worker", SERVICE, "--broker", broker, "--lease", "2"]
    args += ["--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True)
    try:
        run(api, "fail", message="far away")
        samples = scrape(f"http://127.0.0.1:{port}")
        assert value(
            samples, "taskserve_task_outcomes_total", endpoint="fail", status="failure", error_type="ValueError"
        )
        assert value(samples, "taskserve_workers_alive") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert_none_left(env[TAG])
    assert metrics_dirs(broker) == []


def test_tallied_run_times_land_where_prometheus_would_put_them() -> None:
    from prometheus_client import REGISTRY, CollectorRegistry, Histogram

    from taskserve._types import Claim, Outcome, TaskStatus
    from taskserve.worker import metrics
    from taskserve.worker.execute import Running

    registry = CollectorRegistry()
    reference = Histogram("ref_seconds", "", registry=registry, buckets=metrics.RUN_BUCKETS)
    endpoint = type("Endpoint", (), {"name": f"edge{uuid.uuid4().hex[:6]}"})()
    for took in (0.0, 0.001, 0.0011, 0.5, 2.5, 1000.0):  # on the bounds and between them
        running = Running(Claim("t", "/edge", b"{}", "tok", 1, 1, None), endpoint)
        running.started_at = 0.0
        metrics.observe([running], [Outcome("t", "tok", TaskStatus.SUCCESS)], took)
        reference.observe(took)
    metrics.flush()
    for bound in ("0.001", "0.005", "0.5", "2.5", "900.0", "+Inf"):
        ours = REGISTRY.get_sample_value("taskserve_task_run_seconds_bucket", {"endpoint": endpoint.name, "le": bound})
        assert ours == registry.get_sample_value("ref_seconds_bucket", {"le": bound}), bound
    ours = REGISTRY.get_sample_value("taskserve_task_run_seconds_sum", {"endpoint": endpoint.name})
    assert ours == registry.get_sample_value("ref_seconds_sum")


def test_every_worker_family_is_named_before_its_first_sample(tmp_path: Path) -> None:
    """An alert on ``taskserve_task_retries_total`` must find the metric (with no samples) before any retry."""
    from prometheus_client import CollectorRegistry, generate_latest

    from taskserve.server.metrics import WORKER_FAMILIES, register_workers
    from taskserve.worker import metrics as worker_metrics

    declared = {
        m._name: m._type  # the worker's own declarations, which the API's list must follow
        for m in (getattr(worker_metrics, n) for n in dir(worker_metrics))
        if hasattr(m, "_type") and hasattr(m, "_name")
    }
    assert {name: kind for name, kind, _ in WORKER_FAMILIES} == declared
    registry = CollectorRegistry()
    register_workers(registry, str(tmp_path))
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == set(declared)
    assert "# TYPE taskserve_task_retries_total counter" in text
    assert "taskserve_workers_alive 0.0" in text
