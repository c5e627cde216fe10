"""The processes a fault soak (``bench/soak.py``) runs, kills and restarts, and what it saw of them.

Every process started here carries an environment marker that its children inherit, so that
workers, which taskserve starts in sessions of their own, are found (and counted when left
behind) by reading ``/proc/PID/environ``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "bench.services.soak_service:SoakService"
MARKER = "TASKSERVE_SOAK_MARKER"
LEASE = 3.0
ORPHAN_LIMIT = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def state(pid: int) -> str | None:
    """The process's state letter (``Z`` for a zombie), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    return state(pid) not in (None, "Z")


class Processes:
    """Every process the soak starts, each in its own session and marked in its environment.

    Workers are started by taskserve itself (in sessions of their own), so they are found
    by the marker they inherit, in ``/proc/PID/environ``.
    """

    def __init__(self, workdir: Path, run_log: Path) -> None:
        self.workdir = workdir
        self.marker = uuid.uuid4().hex
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            MARKER: self.marker,
            "SOAK_RUN_LOG": str(run_log),
        }
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "ab") as out:
            out.write(f"\n$ {' '.join(args)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started.append(proc)
        return proc

    def marked(self) -> dict[int, tuple[int, str]]:
        """``{pid: (ppid, command line)}`` of every live process carrying this soak's marker."""
        needle = f"{MARKER}={self.marker}".encode()
        found: dict[int, tuple[int, str]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                if needle not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    continue
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                found[int(entry)] = (int(fields[1]), cmdline.strip())
        return found

    def children(self, pid: int) -> list[int]:
        return [p for p, (ppid, _) in self.marked().items() if ppid == pid]

    def workers(self) -> list[int]:
        return [p for p, (_, cmd) in self.marked().items() if " run-worker " in f" {cmd} "]

    def reap(self) -> None:
        for proc in self.started:
            proc.poll()

    def kill_everything(self) -> None:
        """SIGKILL every process this soak started: our children's groups, then anything marked."""
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for _ in range(3):
            for pid in self.marked():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for proc in self.started:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            if not self.marked():
                return
            time.sleep(0.2)


@dataclass
class Figures:
    kills: Counter[str] = field(default_factory=Counter)
    api_downtime: list[float] = field(default_factory=list)
    redis_downtime: list[float] = field(default_factory=list)
    dead: dict[int, float] = field(default_factory=dict)  # pid -> when it died (killed or orphaned)
    outages: list[tuple[float, float]] = field(default_factory=list)  # Redis down, from -> to
    orphans: dict[int, float] = field(default_factory=dict)  # pid -> when its supervisor died
    orphaned: int = 0  # workers whose supervisor was killed under them
    violations: list[str] = field(default_factory=list)


class Cluster:
    """The processes under test, and the kills."""

    def __init__(self, procs: Processes, broker_kind: str, rng: random.Random, figures: Figures) -> None:
        self.procs = procs
        self.kind = broker_kind
        self.rng = rng
        self.figures = figures
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.redis_port = free_port()
        self.redis_dir = procs.workdir / "redis"
        if broker_kind == "redis":
            self.broker = f"redis://127.0.0.1:{self.redis_port}/0"
        else:
            self.broker = f"sqlite:///{procs.workdir / 'tasks.db'}"
        self.api: subprocess.Popen[bytes] | None = None
        self.host: subprocess.Popen[bytes] | None = None
        self.redis: subprocess.Popen[bytes] | None = None

    def common(self) -> list[str]:
        return ["--broker", self.broker, "--concurrency", "4", "--lease", str(LEASE), "--grace", "2"]

    def start_api(self) -> None:
        args = [sys.executable, "-m", "taskserve", "serve", SERVICE, "--port", str(self.port), "--workers", "1"]
        self.api = self.procs.start("api", args + self.common())

    def start_host(self) -> None:
        args = [sys.executable, "-m", "taskserve", "worker", SERVICE, "--workers", "2"]
        self.host = self.procs.start("host", args + self.common())

    def start_redis(self) -> None:
        self.redis_dir.mkdir(exist_ok=True)
        args = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(self.redis_dir)]
        args += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        self.redis = self.procs.start("redis", args)

    async def redis_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
                writer.write(b"PING\r\n")
                reply = await asyncio.wait_for(reader.read(64), 1)
                writer.close()
                if reply.startswith(b"+PONG"):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on port {self.redis_port} within {timeout}s")
            await asyncio.sleep(0.05)

    async def http_up(self, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as http:
            while True:
                assert self.api is not None
                if self.api.poll() is not None:
                    raise RuntimeError(f"taskserve serve exited with {self.api.returncode}; see {self.procs.workdir}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(self.url + path, timeout=2)).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.url}{path} did not answer 200 within {timeout}s")
                await asyncio.sleep(0.05)

    async def start(self) -> None:
        if self.kind == "redis":
            self.start_redis()
            await self.redis_up()
        self.start_api()
        self.start_host()
        await self.http_up("/healthz")

    def kill_kinds(self) -> list[str]:
        return ["worker", "api", "host", "redis"] if self.kind == "redis" else ["worker", "api", "host"]

    def kill_supervisor(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a supervisor; its workers are orphans that must leave by themselves."""
        children = self.procs.children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        died = time.monotonic()
        for pid in children:
            self.figures.orphans[pid] = died
            self.figures.orphaned += 1
            self.figures.dead[pid] = time.time()

    async def kill(self, what: str) -> None:
        self.figures.kills[what] += 1
        if what == "worker":
            workers = self.procs.workers()
            if not workers:
                self.figures.kills[what] -= 1
                return
            victim = self.rng.choice(workers)
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
            self.figures.dead[victim] = time.time()
        elif what == "api":
            assert self.api is not None
            began = time.monotonic()
            self.kill_supervisor(self.api)
            self.start_api()
            await self.http_up("/healthz")
            self.figures.api_downtime.append(time.monotonic() - began)
        elif what == "host":
            assert self.host is not None
            self.kill_supervisor(self.host)
            self.start_host()
        elif what == "redis":
            assert self.redis is not None
            began, down_at = time.monotonic(), time.time()
            self.redis.kill()
            self.redis.wait()
            await asyncio.sleep(self.rng.uniform(0.2, 2.0))
            self.start_redis()
            await self.redis_up()
            self.figures.outages.append((down_at, time.time()))
            self.figures.redis_downtime.append(time.monotonic() - began)

    def check_orphans(self) -> None:
        """A worker whose supervisor was killed must be gone within ORPHAN_LIMIT seconds."""
        now = time.monotonic()
        for pid, died in list(self.figures.orphans.items()):
            if not alive(pid):
                del self.figures.orphans[pid]
            elif now - died > ORPHAN_LIMIT:
                self.figures.violations.append(
                    f"process left behind: worker pid {pid} still runs {now - died:.0f}s after its supervisor "
                    "was killed"
                )
                del self.figures.orphans[pid]

    async def stop(self) -> None:
        """Stop as a user would (SIGTERM, drain), then require that nothing we started remains."""
        for proc in (self.api, self.host):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in (("taskserve serve", self.api), ("taskserve worker", self.host)):
            if proc is None:
                continue
            deadline = time.monotonic() + 20
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                self.figures.violations.append(f"{name} (pid {proc.pid}) did not stop within 20s of SIGTERM")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait(20)
        deadline = time.monotonic() + ORPHAN_LIMIT
        while self.procs.marked() and time.monotonic() < deadline:
            self.check_orphans()
            await asyncio.sleep(0.1)
        self.check_orphans()
        for pid, (ppid, cmd) in self.procs.marked().items():
            self.figures.violations.append(
                f"process left behind after a clean stop: pid {pid} (parent {ppid}): {cmd[:160]}"
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
