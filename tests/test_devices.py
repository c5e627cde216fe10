"""GPU placement: one worker per N GPUs, each seeing only its own through CUDA_VISIBLE_DEVICES.

No GPU is needed: what matters is the environment each worker process is started with, which
the workers report to the registry (``GET /workers``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from taskserve.devices import DeviceError, assign, discover

from .conftest import ROOT, ServerFactory, wait_until


@pytest.mark.parametrize(
    ("per_worker", "gpus", "workers", "plan"),
    [
        (1, ["0", "1"], None, [["0"], ["1"]]),
        (1, ["0", "1", "2"], 2, [["0"], ["1"]]),
        (2, ["0", "1", "2", "3"], None, [["0", "1"], ["2", "3"]]),
        (0.5, ["0", "1"], None, [["0"], ["0"], ["1"], ["1"]]),
        (0.5, ["3"], 1, [["3"]]),
    ],
)
def test_assignment(per_worker: float, gpus: list[str], workers: int | None, plan: list[list[str]]) -> None:
    assert assign(per_worker, gpus, workers) == plan


@pytest.mark.parametrize(
    ("per_worker", "gpus", "workers", "message"),
    [
        (1, ["0", "1"], 3, "3 worker(s) x 1 GPU(s) each need 3 GPU(s), but 2 are available"),
        (2, ["0"], None, "need 2 GPU(s), but 1 are available"),
        (1, [], None, "no GPU was found"),
    ],
)
def test_impossible_requests_name_the_numbers(
    per_worker: float, gpus: list[str], workers: int | None, message: str
) -> None:
    with pytest.raises(DeviceError, match="--gpus") as info:
        assign(per_worker, gpus, workers)
    assert message in str(info.value)


def test_a_share_must_be_whole_gpus_or_a_fraction_of_one() -> None:
    with pytest.raises(DeviceError, match="whole number of GPUs"):
        assign(1.5, ["0", "1"], None)


def test_discovery_prefers_the_option_then_cuda_visible_devices() -> None:
    assert discover("0, 2", {"CUDA_VISIBLE_DEVICES": "5"}) == (["0", "2"], "--gpus")
    assert discover(None, {"CUDA_VISIBLE_DEVICES": "5,6"}) == (["5", "6"], "CUDA_VISIBLE_DEVICES")
    assert discover(None, {"CUDA_VISIBLE_DEVICES": ""}) == ([], "CUDA_VISIBLE_DEVICES")


def worker_gpus(url: str) -> list[str]:
    return sorted(",".join(w["gpus"]) for w in httpx.get(f"{url}/workers").json()["workers"])


@pytest.mark.parametrize(
    ("service", "options", "expected"),
    [
        ("OneGpu", ["--gpus", "0,1"], ["0", "1"]),
        ("TwoGpus", ["--gpus", "0,1,2,3"], ["0,1", "2,3"]),
        ("HalfGpu", ["--gpus", "7"], ["7", "7"]),
    ],
)
def test_each_worker_is_started_with_its_own_gpus(
    make_server: ServerFactory, tmp_path, service: str, options: list[str], expected: list[str]
) -> None:
    server = make_server(f"sqlite:///{tmp_path}/t.db", *options, service=f"tests.gpu_service:{service}", workers=None)
    wait_until(lambda: worker_gpus(server.url) == expected, 30)


def test_cuda_visible_devices_is_used_without_gpus(make_server: ServerFactory, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    server = make_server(f"sqlite:///{tmp_path}/t.db", service="tests.gpu_service:OneGpu", workers=None)
    wait_until(lambda: worker_gpus(server.url) == ["4", "5"], 30)
    assert server.client().visible.submit().get(timeout=20) in ("4", "5")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "0,1", "--workers", "3"], "3 worker(s) x 1 GPU(s) each need 3 GPU(s), but 2 are available"),
        (["--gpus", ""], "no GPU was found"),
    ],
)
def test_start_up_stops_when_the_gpus_do_not_suffice(tmp_path, args: list[str], message: str) -> None:
    cmd = [sys.executable, "-m", "taskserve", "serve", "tests.gpu_service:OneGpu", "--port", "0"]
    cmd += ["--broker", f"sqlite:///{tmp_path}/t.db", *args]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr.decode() and "--gpus" in done.stderr.decode()
