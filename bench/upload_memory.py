"""Peak memory of the API process for one large upload: what a big file costs the server.

Starts a real ``taskserve serve`` (tests.services:TestService, SQLite in a temp dir, one
worker), reads the API process's VmHWM (peak resident memory) from /proc before and after
each upload, and prints the growth next to the upload's size. Each upload gets a fresh
server, as VmHWM never goes down. Linux only (it reads /proc).

    python bench/upload_memory.py                 # 99 MB: a Path multipart, a bytes one, base64 JSON
    python bench/upload_memory.py --mb 20 --only path
    python bench/upload_memory.py --broker redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _mem(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS of a process, in bytes."""
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            figures[key] = int(value.split()[0]) * 1024
    return figures


def _serve(workdir: str, broker: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    args = [sys.executable, "-m", "taskserve", "serve", "tests.services:TestService", "--port", str(port)]
    args += ["--broker", broker, "--workers", "1", "--max-body-size", "200000000"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(Path(workdir) / "server.log", "ab")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=log)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit(f"the server did not start; see {workdir}/server.log")


def _drop(broker: str, prefix: str) -> None:
    """Delete what the run stored in Redis: the uploads would stay for the retention time."""
    import redis

    client = redis.Redis.from_url(broker)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def _upload(kind: str, url: str, data: bytes) -> httpx.Response:
    timeout = httpx.Timeout(120)
    if kind == "path":
        return httpx.post(f"{url}/file_info/submit", files={"upload": ("big.bin", data)}, timeout=timeout)
    if kind == "bytes":
        return httpx.post(f"{url}/reverse_bytes/submit", files={"data": ("big.bin", data)}, timeout=timeout)
    body = b'{"upload": {"data": "' + base64.b64encode(data) + b'", "filename": "big.bin"}}'
    headers = {"content-type": "application/json"}
    return httpx.post(f"{url}/file_info/submit", content=body, headers=headers, timeout=timeout)


def _wait(url: str, task_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status: dict[str, object] = httpx.get(f"{url}/tasks/{task_id}", timeout=10).json()
        if status["status"] in ("success", "failure", "cancelled"):
            return status
        time.sleep(0.2)
    raise SystemExit(f"task {task_id} did not finish")


def measure(kind: str, size: int, broker: str | None = None) -> dict[str, int]:
    data = os.urandom(size * 3 // 4 if kind == "json" else size)  # the JSON body is the size given
    prefix = f"bench-upload-{os.urandom(4).hex()}"
    with tempfile.TemporaryDirectory() as workdir:
        if broker is None:
            url_of_store = f"sqlite:///{workdir}/tasks.db"
        else:  # a prefix of its own on a shared Redis, deleted after
            url_of_store = broker + ("&" if "?" in broker else "?") + f"prefix={prefix}"
        proc, url = _serve(workdir, url_of_store)
        try:
            httpx.post(f"{url}/add/submit", json={"a": 1})  # warm the submit path first
            time.sleep(0.5)
            before = _mem(proc.pid)
            response = _upload(kind, url, data)
            response.raise_for_status()
            after = _mem(proc.pid)
            _wait(url, response.json()["task_id"])
        finally:
            proc.terminate()
            proc.wait(30)
            if broker is not None:
                _drop(broker, prefix)
    return {"before": before["VmHWM"], "peak": after["VmHWM"], "rss_after": after["VmRSS"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=99.0, help="upload size in MB (10^6 bytes)")
    parser.add_argument("--only", default="path,bytes,json", help="comma-separated: path, bytes, json")
    parser.add_argument("--broker", help="a redis:// URL (default: SQLite in a temp dir)")
    options = parser.parse_args()
    size = int(options.mb * 1_000_000)
    mb = 1_000_000
    print(f"upload (request body) {size / mb:.0f} MB, {options.broker or 'SQLite'}; API process VmHWM (peak RSS) in MB")
    print(f"{'upload':<34}{'baseline':>10}{'peak':>10}{'growth':>10}{'x upload':>10}")
    for kind in options.only.split(","):
        figures = measure(kind, size, options.broker)
        growth = figures["peak"] - figures["before"]
        label = {"path": "multipart to a Path param", "bytes": "multipart to a bytes param"}.get(
            kind, "base64 JSON to a Path param"
        )
        print(
            f"{label:<34}{figures['before'] / mb:>10.0f}{figures['peak'] / mb:>10.0f}"
            f"{growth / mb:>10.0f}{growth / size:>10.2f}"
        )


if __name__ == "__main__":
    main()
