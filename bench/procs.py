"""Plumbing for the runner: virtualenvs, child processes, memory, the load generator and Redis.

Standard library only, so `python bench/run.py` works from any Python 3.10+.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENVS = BENCH / ".venvs"
RESULTS = BENCH / "results"
LOGS = RESULTS / "logs"
TASKSERVE_VENV = ROOT / ".venv"


class Unavailable(Exception):
    """A system cannot be installed or started here; the bench skips it and says why."""


# -- virtualenvs ---------------------------------------------------------------------------


def ensure_venv(name: str, requirements: list[str]) -> Path:
    """Create bench/.venvs/NAME with `requirements` once; reuse it while they stay the same."""
    venv = VENVS / name
    stamp = venv / "bench-requirements.txt"
    wanted = "\n".join(requirements) + "\n"
    if stamp.exists() and stamp.read_text() == wanted:
        return venv
    print(f"  installing {name} into {venv} (first run only) ...", flush=True)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    proc = subprocess.run([*pip, *requirements], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.splitlines() if "is ignored" not in line][-5:]
        raise Unavailable(f"pip could not install {' '.join(requirements)}: {' / '.join(tail)}")
    stamp.write_text(wanted)
    return venv


# -- processes -----------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    role: str = "main"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start(name: str, cmd: list[str], env: dict[str, str] | None = None, role: str = "main") -> Proc:
    """Start `cmd` in its own session (so it and its children can be stopped as one group)."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{name}.log"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        popen = subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Proc(name, popen, log, role)


def stop(proc: Proc, sig: int = signal.SIGTERM, grace: float = 20.0) -> None:
    """Stop a process group that `start` made: `sig`, then SIGKILL after `grace` seconds."""
    if proc.popen.poll() is None:
        _signal_group(proc.pid, sig)
        try:
            proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.popen.wait(timeout=10)
    _signal_group(proc.pid, signal.SIGKILL)  # any grandchild left behind in the group


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: Proc, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise Unavailable(f"{proc.name} exited with {proc.popen.returncode}: {proc.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise Unavailable(f"{proc.name} did not answer {url} within {timeout:.0f}s: {proc.log_tail()}")


# -- memory --------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return " ".join(a.decode(errors="replace") for a in argv[:4]).strip()
    except OSError:
        return "?"


class CpuWatch(threading.Thread):
    """Once a second, adds up the CPU time of processes that are neither the bench's own (its
    descendants) nor Redis: other work on the machine that would lower and blur the figures."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.foreign = 0.0  # CPU seconds
        self._done = threading.Event()
        self._hz = os.sysconf("SC_CLK_TCK")

    def run(self) -> None:
        previous = self._sample()
        while not self._done.wait(1.0):
            current = self._sample()
            self.foreign += sum(t - previous.get(pid, 0) for pid, t in current.items()) / self._hz
            previous = current

    def stop(self) -> None:
        self._done.set()

    def _sample(self) -> dict[int, int]:
        stats: dict[int, tuple[int, str, int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    head, _, rest = (entry / "stat").read_text().rpartition(")")
                    fields = rest.split()
                    stats[int(entry.name)] = (int(fields[1]), head.partition("(")[2], int(fields[11]) + int(fields[12]))
                except (OSError, IndexError, ValueError):
                    continue
        ours = {os.getpid(), *descendants(os.getpid())}
        return {
            pid: ticks
            for pid, (ppid, name, ticks) in stats.items()
            if pid not in ours and ppid != 2 and pid != 2 and not name.startswith("redis-server")
        }


# -- the load generator --------------------------------------------------------------------


@dataclass
class LoadGen:
    python: Path
    timeout: float = 900.0
    env: dict[str, str] = field(default_factory=dict)

    def __call__(self, job: dict) -> dict:
        proc = self.open(job)
        return self.finish(proc)

    def open(self, job: dict) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        proc = subprocess.Popen(
            [str(self.python), "-m", "bench.loadgen"],
            cwd=ROOT,
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
        proc.stdin = None  # so that communicate() does not touch it again
        return proc

    def wait_ready(self, proc: subprocess.Popen) -> None:
        """Block until a `drain` job has connected and printed READY."""
        assert proc.stdout is not None
        while (line := proc.stdout.readline()) and line.strip() != "READY":
            pass
        if not line:
            raise RuntimeError(f"the load generator exited before it was ready (exit {proc.wait()})")

    def finish(self, proc: subprocess.Popen) -> dict:
        assert proc.stdout is not None
        try:
            out, _ = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError("the load generator overran its time limit") from None
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"the load generator failed (exit {proc.returncode})")
        return json.loads(lines[-1])


# -- Redis (a few inline commands; no client library needed) ---------------------------------


def redis(db: int, *command: str, host: str = "127.0.0.1", port: int = 6379) -> str:
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"SELECT {db}\r\n{' '.join(command)}\r\n".encode())
        data = b""
        while data.count(b"\r\n") < 2 or (data.split(b"\r\n")[1].startswith(b"$") and not _bulk_done(data)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = data.split(b"\r\n", 1)[1]
    if reply.startswith(b"-"):
        raise RuntimeError(f"Redis answered {reply.decode().strip()} to {command[0]}")
    if reply.startswith(b"$"):
        return reply.split(b"\r\n", 1)[1][: int(reply[1:].split(b"\r\n")[0])].decode()
    return reply.split(b"\r\n")[0][1:].decode()


def _bulk_done(data: bytes) -> bool:
    reply = data.split(b"\r\n", 1)[1]
    header, _, body = reply.partition(b"\r\n")
    return int(header[1:]) < 0 or len(body) >= int(header[1:])


def redis_used_memory(db: int) -> int:
    info = redis(db, "INFO", "memory")
    return int(next(line.split(":")[1] for line in info.splitlines() if line.startswith("used_memory:")))
