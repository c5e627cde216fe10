"""A small run of the fault soak (``bench/soak.py``) on each broker.

The soak kills workers, the API process, a worker host's supervisor and (on Redis) Redis
itself with SIGKILL while it submits tasks of every kind, then checks that no accepted
task was lost, none ran twice to success, no result was wrong, no terminal state changed
and no process was left behind. ``python bench/soak.py --help`` runs larger ones.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow


def run_soak(*args: str, timeout: float) -> tuple[int, str]:
    """Run the soak; past ``timeout`` it gets SIGTERM, on which it kills all it started."""
    proc = subprocess.Popen(
        [sys.executable, "bench/soak.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"the soak ran longer than {timeout}s:\n{out}")
    return proc.returncode, out


@pytest.mark.parametrize("broker", ["sqlite", "redis"])
def test_a_small_fault_soak_finds_no_violation(broker: str) -> None:
    if broker == "redis" and shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("The Redis soak needs the redis-server program, and CI=true needs it.")
        pytest.skip("The Redis soak needs the redis-server program, to kill and restart a Redis of its own.")
    args = ["--tasks", "120", "--kills", "6", "--broker", broker, "--seed", "1", "--max-seconds", "45"]
    code, out = run_soak(*args, timeout=100)  # past --max-seconds it reports what had not finished
    assert code == 0, out
    assert "violations: 0" in out
    assert "kills" in out and "api" in out and "worker" in out
