"""Processes: supervisor death, recycling, stopping with the broker down, the port, runtime files."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from taskserve import _runtime
from taskserve.queue._wake import Waker
from taskserve.queue.sqlite import SQLiteQueue

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

SLOW = "tests.slow_import_service:SlowImport"


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tasks.db'}"


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def files_under(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*"))


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "taskserve", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# -- the supervisor dies ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["IMPORT", "INIT"])
def test_workers_exit_when_the_server_is_killed_while_they_import_or_build_the_service(
    make_server: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    marker = tmp_path / "importing"
    monkeypatch.setenv("SLOW_IMPORT_MARKER", str(marker))
    monkeypatch.setenv(f"SLOW_{phase}_SECONDS", "60")
    server = make_server(sqlite_url(tmp_path), service=SLOW, workers=2, start=False)
    server.start_no_wait()
    wait_until(lambda: len(lines(marker)) == 2, 30)
    server.kill()
    assert_none_left(server.tag, 5)


@pytest.mark.slow
def test_a_worker_whose_server_is_killed_mid_task_hands_the_task_back_and_exits(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    broker = sqlite_url(tmp_path)
    server = make_server(broker, "--lease", "30", workers=1)
    task = server.client().slow_sync.submit(seconds=60, marker=str(tmp_path / "m"))
    wait_until(lambda: (tmp_path / "m").exists())
    server.kill()
    assert_none_left(server.tag, 5)
    assert "lost its supervisor" in server.log.read_text()
    record = make_server(broker, workers=0).client().slow_sync.task(task.id).status()
    assert (record["status"], record["attempts"]) == ("pending", 0)  # handed back, not left to its lease


# -- recycling -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_stuck_in_c_code_is_recycled_at_once(make_server: ServerFactory, tmp_path: Path) -> None:
    # A lease longer than the 2 s timeout plus the 3 s the worker waits for the thread to stop.
    server = make_server(sqlite_url(tmp_path), "--lease", "10", workers=1)
    client = server.client()
    task = client.stuck_in_c.submit()
    wait_until(lambda: task.get_status().value == "in_progress")
    stuck = worker_pid(server.url, task.status()["worker"])
    assert task.wait(timeout=20).value == "failure"
    assert "TimeoutError" in task.status()["error"]
    wait_until(lambda: not Path(f"/proc/{stuck}").exists(), 10)  # not 95 s later
    assert client.echo.submit(text="next").get(timeout=20) == "next"
    assert stuck not in server.worker_pids()


# -- stopping ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.redis
def test_stopping_with_the_broker_down_takes_the_grace_and_a_second(make_server: ServerFactory, tmp_path: Path) -> None:
    redis = RedisServer()
    redis.start()
    try:
        server = make_server(redis.url, "--grace", "1", workers=1, start=False)
        server.start_no_wait()
        server.workers_ready(1)
        task = server.client().slow_async.submit(seconds=60, marker=str(tmp_path / "m"))
        wait_until(lambda: (tmp_path / "m").exists())
        wait_until(lambda: task.get_status().value == "in_progress")
    finally:
        redis.stop()
    began = time.monotonic()
    server.stop()
    # The grace (1 s) and a second, with room for a loaded machine: not the 30 s of a broker timeout.
    assert time.monotonic() - began < 8
    assert sum(line.endswith(": stopped") for line in server.log.read_text().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.redis
def test_a_shutdown_stuck_on_a_frozen_broker_still_ends_with_its_workers(make_server: ServerFactory) -> None:
    # Redis accepts connections but never answers: the API's start is stuck on its first
    # command (30 s socket timeout, retried), so nothing but the forced stages can end it.
    redis = RedisServer()
    redis.start()
    try:
        assert redis.process is not None
        os.kill(redis.process.pid, signal.SIGSTOP)
        server = make_server(redis.url, "--grace", "1", workers=1, start=False)
        server.start_no_wait()
        wait_until(lambda: "worker 0 started" in server.log.read_text(), 30)  # our signal handlers are in
        began = time.monotonic()
        server.stop()  # fails if the process outlives SIGTERM by 30 s
        took = time.monotonic() - began
        log = server.log.read_text()
        assert "exiting now" in log and "Traceback" not in log, log[-3000:]
        assert took < 1 + 2 * 10 + 5  # the grace, the two margins (cli.SHUTDOWN_MARGIN), room for a loaded machine
        assert_none_left(server.tag)
    finally:
        redis.stop()  # SIGKILL ends a stopped process too


@pytest.mark.slow
def test_taskserve_worker_starts_the_services_worker_count_and_says_it_stopped(tmp_path: Path) -> None:
    tag = f"worker-{os.getpid()}-{time.monotonic_ns()}"
    log = tmp_path / "worker.log"
    args = [sys.executable, "-m", "taskserve", "worker", SLOW, "--broker", sqlite_url(tmp_path)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args, cwd=ROOT, env=tagged_env(tag), stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
    try:
        wait_until(lambda: log.read_text().count(" ready: ") == 2, 30)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "running 2 worker process(es)" in log.read_text()
    assert log.read_text().rstrip().endswith(": stopped")
    assert_none_left(tag)


# -- the port ------------------------------------------------------------------------------


def test_a_port_in_use_fails_at_once_naming_it_and_starts_no_worker(tmp_path: Path) -> None:
    tag = f"port-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["serve", SERVICE, "--port", str(port), "--broker", sqlite_url(tmp_path), "--workers", "2"]
        done = run_cli(*args, env=tagged_env(tag))
    assert done.returncode != 0
    assert f"127.0.0.1:{port}" in done.stderr and "--port" in done.stderr
    assert "worker 0 started" not in done.stderr and "Traceback" not in done.stderr
    assert_none_left(tag, 0)


# -- runtime files -------------------------------------------------------------------------


@pytest.mark.slow
def test_runtime_files_are_private_in_one_place_and_gone_after_a_clean_stop(
    make_server: ServerFactory, runtime_base: Path, tmp_path: Path
) -> None:
    server = make_server(sqlite_url(tmp_path), workers=2)
    assert server.client().echo.submit(text="x").get(timeout=20) == "x"
    (store,) = runtime_base.iterdir()
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert len([p for p in store.iterdir() if p.name.startswith("worker-")]) == 2
    assert stat.S_IMODE((tmp_path / "tasks.db").stat().st_mode) == 0o600
    server.stop()
    assert files_under(runtime_base) == []


@pytest.mark.slow
def test_what_a_kill_left_behind_is_swept_by_the_next_run(
    make_server: ServerFactory, runtime_base: Path, tmp_path: Path
) -> None:
    server = make_server(sqlite_url(tmp_path), workers=2)
    assert server.client().echo.submit(text="x").get(timeout=20) == "x"
    assert server.proc is not None
    workers = server.worker_pids()
    os.kill(server.proc.pid, signal.SIGSTOP)  # so that it neither restarts them nor leaves them orphans
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    server.kill()
    assert sum("/worker-" in name for name in files_under(runtime_base)) == 2
    other_store = f"sqlite:///{tmp_path / 'other.db'}"  # the killed store may never be used again
    again = make_server(other_store, workers=1)
    assert again.client().echo.submit(text="y").get(timeout=20) == "y"
    again.stop()
    assert files_under(runtime_base) == []


def test_worker_command_lines_carry_no_broker_url_and_ids_are_unique(served_sqlite: str) -> None:
    workers = httpx.get(f"{served_sqlite}/workers", timeout=10).json()["workers"]
    assert len({w["id"] for w in workers}) == len(workers) == 2
    for w in workers:
        assert str(w["pid"]) not in w["id"].split(":")  # pids repeat across containers
        cmdline = Path(f"/proc/{w['pid']}/cmdline").read_bytes()
        assert b"sqlite" not in cmdline and b"--broker" not in cmdline


@pytest.fixture
def served_sqlite(make_server: ServerFactory, tmp_path: Path) -> str:
    server = make_server(sqlite_url(tmp_path), workers=2)
    server.workers_ready(2)
    wait_until(lambda: len(httpx.get(f"{server.url}/workers", timeout=10).json()["workers"]) == 2)
    return server.url


@pytest.mark.parametrize("kind", ["symlink", "group-writable", "foreign-owner"])
def test_a_runtime_directory_that_is_not_private_is_refused(runtime_base: Path, tmp_path: Path, kind: str) -> None:
    path = Path(_runtime.runtime_dir(_runtime.sqlite_key(str(tmp_path / "tasks.db"))))
    if kind == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        path.symlink_to(tmp_path / "elsewhere")
    else:
        path.mkdir(mode=0o700)
        path.chmod(0o770 if kind == "group-writable" else 0o700)
        if kind == "foreign-owner":
            if os.getuid() != 0:
                pytest.skip("only root can give a directory to another user")
            os.chown(path, 4321, -1)
    with pytest.raises(_runtime.RuntimeDirError, match="Refusing the runtime directory"):
        Waker(str(tmp_path / "tasks.db"))
    done = run_cli("serve", SERVICE, "--port", "0", "--broker", sqlite_url(tmp_path), env=tagged_env("refused"))
    assert done.returncode != 0 and "Refusing the runtime directory" in done.stderr


@pytest.mark.anyio
async def test_the_sqlite_files_are_created_readable_by_their_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        queue = SQLiteQueue(sqlite_url(tmp_path))
        await queue.connect()
    finally:
        os.umask(old)
    try:
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.glob("tasks.db*")}
    finally:
        await queue.close()
    assert modes == {"tasks.db": 0o600, "tasks.db-wal": 0o600, "tasks.db-shm": 0o600}
