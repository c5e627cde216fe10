"""Process-level faults: a worker frozen holding SQLite's write lock, a killed worker's uploads, a full disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest

from taskserve.cli import ByteSize

from .conftest import ServerFactory, wait_until

PROCS = "tests.procs_service:Procs"


def state(pid: int) -> str:
    """The process's state letter (R, S, T for stopped, Z), or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def status_of(url: str, route: str, task_id: str) -> str:
    status: str = httpx.get(f"{url}/{route}/status", params={"task_id": task_id}, timeout=10).json()["status"]
    return status


def result_of(url: str, route: str, task_id: str) -> object:
    wait_until(lambda: status_of(url, route, task_id) not in ("pending", "in_progress"), 20)
    return httpx.get(f"{url}/{route}/get", params={"task_id": task_id}, timeout=10).json()


def test_a_worker_frozen_holding_the_write_lock_is_replaced_and_submits_fail_fast_meanwhile(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    broker = f"sqlite:///{tmp_path / 'tasks.db'}"
    server = make_server(broker, "--lock-timeout", "4", "--busy-timeout", "1", workers=2, service=PROCS)
    url = server.url
    pids = server.worker_pids()
    marker = tmp_path / "froze"
    frozen_task = httpx.post(f"{url}/freeze_in_write/submit", json={"marker": str(marker)}, timeout=10).json()
    frozen = wait_until(lambda: next((pid for pid in pids if state(pid) == "T"), None), 15)
    froze_at = time.monotonic()

    # Frozen inside a transaction: every write waits on it, but a submit gets a prompt, actionable 503.
    for _ in range(2):
        started = time.monotonic()
        reply = httpx.post(f"{url}/echo/submit", json={"text": "x"}, timeout=10)
        assert time.monotonic() - started < 2.5
        assert reply.status_code == 503, reply.text
        assert "busy" in reply.json()["error"] and "retry" in reply.json()["error"]
        assert reply.headers["Retry-After"] == "1"

    # The supervisor kills it once it has held the lock past --lock-timeout, and starts another.
    wait_until(lambda: state(frozen) in ("", "Z"), 10)
    assert time.monotonic() - froze_at < 4 + 3
    assert "held the SQLite write lock" in server.log.read_text()
    reply = httpx.post(f"{url}/echo/submit", json={"text": "again"}, timeout=10)
    assert reply.status_code == 200, reply.text
    assert result_of(url, "echo", reply.json()["task_id"]) == "again"
    # The task it held runs again elsewhere: nothing is lost.
    assert result_of(url, "freeze_in_write", frozen_task["task_id"]) == "rerun"
    wait_until(lambda: len(server.worker_pids()) == 2 and frozen not in server.worker_pids(), 15)


def uploads(base: Path) -> list[Path]:
    """The files of tasks under the workers' scratch directories."""
    return [p for p in base.rglob("*") if p.is_file() and any(part.startswith("worker-") for part in p.parts)]


def test_a_killed_workers_uploads_are_removed_and_a_cancelled_upload_leaves_none(
    make_server: ServerFactory, runtime_base: Path, tmp_path: Path
) -> None:
    server = make_server(f"sqlite:///{tmp_path / 'tasks.db'}", workers=1, service=PROCS)
    url, data = server.url, os.urandom(3000)
    fields = {"seconds": "60", "marker": str(tmp_path / "ran")}
    held = httpx.post(f"{url}/hold_upload/submit", data=fields, files={"upload": ("big.bin", data)}, timeout=10)
    (upload,) = wait_until(lambda: uploads(runtime_base), 15)
    assert upload.read_bytes() == data and held.json()["task_id"] in str(upload)
    # Queued behind it, then cancelled: its upload never reaches the disk.
    queued = httpx.post(
        f"{url}/hold_upload/submit", data={"seconds": "0"}, files={"upload": ("q.bin", b"q")}, timeout=10
    )
    assert httpx.post(f"{url}/hold_upload/cancel", params={"task_id": queued.json()["task_id"]}, timeout=10).is_success

    (worker,) = server.worker_pids()
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: not upload.exists(), 1.0)  # swept at its death, not by the next worker to start
    assert result_of(url, "hold_upload", held.json()["task_id"]) == len(data)  # re-run from the stored upload
    assert status_of(url, "hold_upload", queued.json()["task_id"]) == "cancelled"
    assert uploads(runtime_base) == []


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[bool]:
    """A tmpfs of ``size`` at ``path`` when we may mount one (root), else nothing (False)."""
    path.mkdir()
    mounted = (
        os.geteuid() == 0
        and shutil.which("mount") is not None
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def test_readyz_answers_503_naming_the_directory_while_the_disk_is_full(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    with small_disk(store, "4m") as mounted:
        free = shutil.disk_usage(store).free
        # On a small real disk, fill it; where none can be mounted, ask for more room than there is.
        bound = 1_000_000 if mounted else free * 2
        server = make_server(
            f"sqlite:///{store / 'tasks.db'}", "--min-free-disk", str(bound), start=False, service=PROCS
        )
        server.start_no_wait()
        if mounted:
            wait_until(server.ready, 30, 0.05)
            filler = store / "filler"
            filler.write_bytes(b"\0" * (shutil.disk_usage(store).free - 300_000))
        reply = wait_until(lambda: (r := httpx.get(f"{server.url}/readyz", timeout=5)).status_code == 503 and r, 30)
        body = reply.json()
        assert body["status"] == "disk_full"
        (short,) = body["disk"]
        assert short["path"] == str(store) and short["free_bytes"] < bound
        assert str(store) in body["error"] and "--min-free-disk" in body["error"]
        if mounted:
            filler.unlink()
            wait_until(lambda: httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200, 5)
            # Reads and writes work again: the store was never damaged.
            reply = httpx.post(f"{server.url}/echo/submit", json={"text": "ok"}, timeout=10)
            assert result_of(server.url, "echo", reply.json()["task_id"]) == "ok"
        server.stop()


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("500000", 500_000), ("100MB", 100_000_000), ("1.5 GB", 1_500_000_000), ("512MiB", 2**29)],
)
def test_min_free_disk_takes_sizes_with_units(text: str, size: int) -> None:
    assert ByteSize().convert(text, None, None) == size


def test_a_size_that_is_not_one_is_refused_saying_what_to_write() -> None:
    with pytest.raises(click.BadParameter, match="kB, MB, GB"):
        ByteSize().convert("lots", None, None)
