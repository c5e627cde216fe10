"""How each system under test is installed, started, pre-filled, measured and stopped.

A `System` starts a `Running` instance: its processes (for memory), the driver spec the load
generator connects with, and where it keeps its tasks (for bytes per task).
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs
from bench.procs import Proc, Unavailable

TS_TARGET = "bench.services.ts_service:Bench"
TS_REDIS_DB = 15
CELERY_REDIS_DB = 14
BENTOML_REQUIREMENTS = ["bentoml==1.4.40", "pillow"]
CELERY_REQUIREMENTS = ["celery[redis]>=5.7,<5.8", "pillow"]


@dataclass
class Running:
    system: System
    procs: list[Proc]
    driver: dict
    tmp: Path
    store: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exec_log(self) -> Path:
        return self.tmp / "exec.log"

    def exec_offset(self) -> int:
        return self.exec_log.stat().st_size if self.exec_log.exists() else 0

    def executions(self, offset: int) -> list[list[str]]:
        """The task runs logged since `offset` (see bench/services/execlog.py)."""
        if not self.exec_log.exists():
            return []
        with open(self.exec_log, "rb") as f:
            f.seek(offset)
            return [line.split() for line in f.read().decode().splitlines()]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            procs.stop(proc)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def memory(self) -> dict[str, float | None]:
        """RSS in MB of the main process (None if there is none) and of all the workers together."""
        mains = [p for p in self.procs if p.role == "main"]
        main = sum(procs.rss_mb(p.pid) for p in mains) if mains else None
        kids = [pid for p in self.procs for pid in ([p.pid] if p.role == "worker" else []) + procs.descendants(p.pid)]
        return {"main": main, "workers": sum(procs.rss_mb(pid) for pid in kids), "worker_count": len(kids)}

    def alive(self) -> bool:
        return all(p.alive() for p in self.procs)


class System:
    name = "?"
    scenarios: set[int] = set()
    drains: tuple[str, ...] = ()  # brokers scenario 3 runs on
    concurrency_variants: tuple[str, ...] = ("default",)

    def prepare(self) -> None:
        """Install what the system needs; raise `Unavailable` with the reason if it cannot."""

    def start(self, *, broker: str = "sqlite", concurrency: str = "default", workers: int = 2, **_: Any) -> Running:
        raise NotImplementedError

    def start_workers(self, running: Running, n: int = 2) -> list[Proc]:
        raise NotImplementedError

    def prefill_direct(self, running: Running, n: int) -> bool:
        """Store `n` finished tasks without the API, if that is the system's fastest way."""
        return False

    def store_bytes(self, running: Running, wal: bool = True) -> int | None:
        """Bytes on disk of the SQLite store: the database file, and with `wal` its -wal/-shm too."""
        if running.store is None or not running.store.exists():
            return None
        files = running.store.parent.glob(running.store.name + "*") if wal else [running.store]
        return sum(f.stat().st_size for f in files)

    def _tmp(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))


def _env(tmp: Path) -> dict[str, str]:
    return {"BENCH_EXEC_LOG": str(tmp / "exec.log")}


class Ceiling(System):
    name = "ceiling"
    scenarios = {1, 2, 6}

    def prepare(self) -> None:
        if not (procs.TASKSERVE_VENV / "bin" / "uvicorn").exists():
            raise Unavailable(f"no uvicorn in {procs.TASKSERVE_VENV}; the ceiling runs in the project venv")

    def start(self, **_: Any) -> Running:
        port = procs.free_port()
        uvicorn = str(procs.TASKSERVE_VENV / "bin" / "uvicorn")
        cmd = [
            uvicorn,
            "bench.peers.ceiling_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        proc = procs.start("ceiling", cmd)
        url = f"http://127.0.0.1:{port}"
        procs.wait_http(url + "/readyz", proc)
        return Running(self, [proc], {"kind": "http", "url": url}, self._tmp())


class TaskServe(System):
    name = "taskserve"
    scenarios = {1, 2, 3, 4, 5, 6}
    drains = ("sqlite", "redis")
    concurrency_variants = ("default", "c8")

    def __init__(self) -> None:
        self.exe = procs.TASKSERVE_VENV / "bin" / "taskserve"

    def prepare(self) -> None:
        if not self.exe.exists():
            raise Unavailable(f"{self.exe} does not exist (run `pip install -e .` in the project venv)")

    def _broker(self, kind: str, tmp: Path) -> tuple[str, Path | None]:
        if kind == "redis":
            procs.redis(TS_REDIS_DB, "FLUSHDB")
            return f"redis://127.0.0.1:6379/{TS_REDIS_DB}", None
        return f"sqlite:///{tmp}/tasks.db", tmp / "tasks.db"

    def start(self, *, broker: str = "sqlite", concurrency: str = "default", workers: int = 2, **_: Any) -> Running:
        tmp = self._tmp()
        url, store = self._broker(broker, tmp)
        port = procs.free_port()
        cmd = [
            str(self.exe),
            "serve",
            TS_TARGET,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--broker",
            url,
        ]
        if concurrency == "c8":
            cmd += ["--concurrency", "8"]
        proc = procs.start(f"taskserve-{broker}-{concurrency}-w{workers}", cmd, _env(tmp))
        base = f"http://127.0.0.1:{port}"
        try:
            # /readyz answers 503 until a worker serves every route; an API alone (workers 0,
            # its workers started later) is up once /healthz answers.
            procs.wait_http(base + ("/readyz" if workers else "/healthz"), proc)
        except Unavailable:
            procs.stop(proc)
            raise
        return Running(self, [proc], {"kind": "http", "url": base}, tmp, store, {"broker": url})

    def start_workers(self, running: Running, n: int = 2) -> list[Proc]:
        cmd = [str(self.exe), "worker", TS_TARGET, "--broker", running.extra["broker"]]
        return [procs.start(f"taskserve-worker-{k}", cmd, _env(running.tmp), role="worker") for k in range(n)]


class BentoML(System):
    """BentoML runs its tasks inside its service workers, with state in one SQLite file.

    One worker by default: with two, both processes write that file and BentoML answers
    "database is locked" to many submits and leaves tasks `in_progress` for ever (see README).
    """

    scenarios = {1, 2, 4, 5, 6}

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self.name = "bentoml" if workers == 1 else f"bentoml-{workers}w"

    def prepare(self) -> None:
        self.venv = procs.ensure_venv("bentoml", BENTOML_REQUIREMENTS)

    def start(self, **_: Any) -> Running:
        tmp = self._tmp()
        port = procs.free_port()
        env = {
            "BENTOML_HOME": str(tmp / "home"),
            "BENTOML_RESULT_STORE": str(tmp / "result.db"),
            "BENTOML_DO_NOT_TRACK": "true",
            "BENCH_BENTOML_WORKERS": str(self.workers),
            **_env(tmp),
            # Like the ceiling and taskserve, no access log; BentoML's own task log stays on.
            "BENTOML_CONFIG_OPTIONS": "api_server.logging.access.enabled=false",
        }
        cmd = [
            str(self.venv / "bin" / "bentoml"),
            "serve",
            "bench.peers.bentoml_service:Bench",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        proc = procs.start(self.name, cmd, env)
        base = f"http://127.0.0.1:{port}"
        try:
            procs.wait_http(base + "/readyz", proc, timeout=120)
        except Unavailable:
            procs.stop(proc)
            raise
        return Running(self, [proc], {"kind": "http", "url": base}, tmp, tmp / "result.db")

    def prefill_direct(self, running: Running, n: int) -> bool:
        """Copy a real finished noop row `n` times into BentoML's result store, with fresh ids."""
        with sqlite3.connect(running.store, timeout=60) as db:  # type: ignore[arg-type]
            db.execute("PRAGMA busy_timeout=60000")
            db.execute(
                "WITH RECURSIVE seq(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM seq WHERE k < ?) "
                "INSERT INTO result (task_id, name, input, status, result, created_at, executed_at, completed_at) "
                "SELECT lower(hex(randomblob(16))), name, input, status, result, created_at, executed_at, completed_at "
                "FROM seq, (SELECT * FROM result WHERE name = 'noop' AND status = 'completed' LIMIT 1)",
                (n,),
            )
        return True


class Celery(System):
    scenarios = {1, 2, 3, 4, 5, 6}
    drains = ("redis",)
    concurrency_variants = ("default", "c8")

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.name = f"celery-{pool}"
        # A solo worker runs one task at a time by design: it has no concurrency setting.
        self.concurrency_variants = ("default",) if pool == "solo" else ("default", "c8")
        self.redis_url = f"redis://127.0.0.1:6379/{CELERY_REDIS_DB}"

    def prepare(self) -> None:
        self.venv = procs.ensure_venv("celery", CELERY_REQUIREMENTS)
        try:
            procs.redis(CELERY_REDIS_DB, "PING")
        except OSError as exc:
            raise Unavailable(f"no Redis at 127.0.0.1:6379 ({exc})") from None

    def start(
        self, *, concurrency: str = "default", workers: int = 2, track_started: bool = False, **_: Any
    ) -> Running:
        procs.redis(CELERY_REDIS_DB, "FLUSHDB")
        extra = {"concurrency": concurrency, "track_started": track_started}
        running = Running(self, [], {"kind": "celery", "redis": self.redis_url}, self._tmp(), extra=extra)
        if workers:
            running.procs = self.start_workers(running, workers)
        return running

    def start_workers(self, running: Running, n: int = 2) -> list[Proc]:
        """solo: `n` single-task worker processes; prefork: one worker with `n` (x8 for c8) children."""
        celery = str(self.venv / "bin" / "celery")
        base = [
            celery,
            "-A",
            "bench.peers.celery_app",
            "worker",
            "-l",
            "warning",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        env = {
            "BENCH_CELERY_REDIS": self.redis_url,
            "BENCH_CELERY_TRACK_STARTED": "1" if running.extra.get("track_started") else "0",
            **_env(running.tmp),
        }
        if self.pool == "solo":
            return [
                procs.start(f"celery-solo-{k}", [*base, "--pool=solo", "-n", f"solo{k}@%h"], env, role="worker")
                for k in range(n)
            ]
        slots = n * (8 if running.extra.get("concurrency") == "c8" else 1)
        return [
            procs.start("celery-prefork", [*base, "--pool=prefork", f"--concurrency={slots}", "-n", "prefork@%h"], env)
        ]

    def store_bytes(self, running: Running, wal: bool = True) -> int | None:
        return None  # Redis keeps results in memory: scenario 6 measures its used_memory instead


def all_systems() -> list[System]:
    """Every system in table order; `bentoml-2w` runs only when named with --only."""
    return [Ceiling(), TaskServe(), BentoML(), Celery("solo"), Celery("prefork"), BentoML(workers=2)]


OPT_IN = {"bentoml-2w"}
