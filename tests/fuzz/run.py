"""Fuzz a real taskserve server from its own /docs.json with schemathesis; exit non-zero on any finding.

    python -m tests.fuzz.run [--examples N] [--seed S] [--workers W] [--max-time SECONDS]

Starts ``taskserve serve tests.fuzz_service:FuzzService`` (SQLite in a temporary directory, one
worker process), runs ``st run`` with tests/fuzz/schemathesis.toml (every check, the
exceptions named there), then stops the server. tests/test_fuzz.py runs it with a small
budget in CI; scripts/fuzz with a large one. A fixed seed makes a run repeatable.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("schemathesis.toml")
SERVICE = "tests.fuzz_service:FuzzService"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(directory: str, port: int) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "taskserve", "serve", SERVICE, "--port", str(port), "--workers", "1"]
    args += ["--broker", f"sqlite:///{directory}/tasks.db", "--call-timeout", "5", "--allowed-host", "127.0.0.1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(Path(directory) / "server.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {(Path(directory) / 'server.log').read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not become ready within 60s")


# The routes by task id (status, get, wait, ...) run the same code for every endpoint: a quick run
# fuzzes them on two endpoints only, and every endpoint's submit, submit_many and direct call.
SAME_FOR_EVERY_ENDPOINT = (
    r"^(GET|POST|PUT) /(caption|thumbnail|checksum|stats|search|midpoint)/"
    r"(status|get|wait|events|preview|cancel|retry|wait_many)$"
)


def fuzz(examples: int, seed: int, workers: int, max_time: int | None, quick: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="taskserve-fuzz-") as directory:
        port = _free_port()
        proc = serve(directory, port)
        try:
            st = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run"]
            st += [f"http://127.0.0.1:{port}/docs.json", "--max-examples", str(examples), "--seed", str(seed)]
            st += ["--workers", str(workers), "--generation-database", "none", "--request-timeout", "40"]
            st += ["--no-color", "--max-failures", "50"]
            if quick:
                st += ["--exclude-name-regex", SAME_FOR_EVERY_ENDPOINT]
            if max_time is not None:
                st += ["--max-time", str(max_time)]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            return subprocess.run(st, cwd=ROOT, env=env).returncode
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100, help="test cases per operation (default 100)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="concurrent schemathesis workers (default 1)")
    parser.add_argument("--max-time", type=int, default=None, help="seconds for the whole run")
    parser.add_argument("--quick", action="store_true", help="the by-id routes of two endpoints only (CI)")
    options = parser.parse_args()
    sys.exit(fuzz(options.examples, options.seed, options.workers, options.max_time, options.quick))


if __name__ == "__main__":
    main()
