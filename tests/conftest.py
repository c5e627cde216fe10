"""Fixtures that start the real thing: ``taskserve serve`` in a subprocess on a free port."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
SERVICE = "tests.services:TestService"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_available() -> bool:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
        return True
    except Exception:
        return False


def need_redis() -> None:
    """In CI a missing Redis is a failure; on a laptop, a skip."""
    if not redis_available():
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis is not reachable at {REDIS_URL}, and CI=true needs it.")
        pytest.skip(f"Redis is not reachable at {REDIS_URL}")


def clear_redis(prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


def wait_until(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        time.sleep(interval)


TAG = "TASKSERVE_TEST_TAG"


def tagged_env(tag: str) -> dict[str, str]:
    """The environment for a process a test starts: its tag is inherited by every process it starts."""
    return {**os.environ, "PYTHONPATH": str(ROOT), TAG: tag}


# Looked up now, not in the forked child, where loading a library could deadlock.
_prctl = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """``preexec_fn`` for a process a test starts: SIGTERM it if pytest itself is killed (Linux).

    The kernel ties this to the thread that starts the process: start them from the main thread.
    """
    if _prctl is not None:
        _prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG


def tagged_processes(tag: str) -> list[int]:
    """Live processes (zombies excepted) whose environment carries ``tag``."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and _alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile, or not ours
    return found


def assert_none_left(tag: str, timeout: float = 5.0) -> None:
    """Fail unless every process tagged ``tag`` is gone within ``timeout``; kill the rest either way."""
    deadline = time.monotonic() + timeout
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left:
        raise AssertionError(f"processes left behind {timeout}s after the end: {_describe(left)}")


def _describe(pids: list[int]) -> str:
    lines = []
    for pid in pids:
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            lines.append(f"{pid} {cmd}")
    return "; ".join(lines) or str(pids)


@dataclass
class Server:
    """A running ``taskserve serve``; ``url`` is its base URL, ``log`` its output file.

    Its processes (the server and every worker it starts) carry ``tag`` in their environment,
    so a test can tell that none is left behind, whatever was killed.
    """

    args: list[str]
    port: int
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)
    clients: list[Any] = field(default_factory=list)

    def client(self) -> Any:
        """A SyncHTTPClient on this server, closed when the server is stopped."""
        import taskserve

        client = taskserve.SyncHTTPClient(self.url)
        self.clients.append(client)
        return client

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        self.start_no_wait()
        wait_until(self.ready, timeout, 0.05)
        return self

    @property
    def tag(self) -> str:
        return self.env[TAG]

    def start_no_wait(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.args,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"taskserve serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
        # /readyz waits for live workers; an API-only server (--workers 0) is up once it answers.
        api_only = "--workers" in self.args and self.args[self.args.index("--workers") + 1] == "0"
        try:
            return httpx.get(f"{self.url}/{'healthz' if api_only else 'readyz'}", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def workers_ready(self, n: int) -> None:
        wait_until(lambda: self.log.read_text().count("ready:") >= n, 30)

    def worker_pids(self) -> list[int]:
        pids: list[int] = httpx.get(f"{self.url}/readyz", timeout=5).json()["worker_pids"]
        return pids

    def kill_all(self) -> None:
        """SIGKILL the API process and every worker at once, as a machine crash would."""
        pids = self.worker_pids()
        assert self.proc is not None
        for pid in [self.proc.pid, *pids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)
        wait_until(lambda: not any(_alive(pid) for pid in pids), 10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        hung = False
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                hung = True
                self.kill()
        for p in self.extra:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        if hung:  # a stop that hangs is a bug users meet at every deploy: never let it pass silently
            raise AssertionError(
                f"taskserve serve did not stop within 30 s of SIGTERM:\n{self.log.read_text()[-3000:]}"
            )


def worker_pid(url: str, worker_id: str) -> int:
    """The pid of a worker, by the id that task statuses show, from the server's worker registry."""
    workers = httpx.get(f"{url}/workers", timeout=10).json()["workers"]
    return int(next(w["pid"] for w in workers if w["id"] == worker_id))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie whose parent died is reaped by init soon; treat it as gone.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


ServerFactory = Callable[..., Server]


BROKERS = ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@contextlib.contextmanager
def fresh_broker(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh SQLite file, or Redis under a fresh key prefix (deleted afterwards)."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'tasks.db'}"
        return
    need_redis()
    prefix = f"tstest-{uuid.uuid4().hex[:10]}"
    try:
        yield f"{REDIS_URL}?prefix={prefix}"
    finally:
        clear_redis(prefix)


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Each broker the contract holds on; tests taking it run once per broker."""
    with fresh_broker(request.param, tmp_path_factory) as url:
        yield url


@pytest.fixture
def redis_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shared Redis under a fresh key prefix, for tests about several hosts."""
    with fresh_broker("redis", tmp_path_factory) as url:
        yield url


@contextlib.contextmanager
def module_server(
    tmp_path_factory: pytest.TempPathFactory,
    broker: str,
    *options: str,
    env: dict[str, str] | None = None,
    service: str = SERVICE,
) -> Iterator[Server]:
    """A ``taskserve serve`` shared by a module's tests: started once, stopped with none of its processes left."""
    port = free_port()
    args = [sys.executable, "-m", "taskserve", "serve", service, "--port", str(port), "--broker", broker, *options]
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = Server(args, port, log, {**tagged_env(uuid.uuid4().hex), **(env or {})})
    try:
        # Started inside: a start that times out (workers not ready in time) is stopped and
        # checked too, not left running, with its workers, until the session ends.
        yield server.start()
    finally:
        server.stop()
        assert_none_left(server.tag)


@pytest.fixture(scope="module", params=BROKERS)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with two workers per module and broker, for tests that only add tasks."""
    options = ["--workers", "2", "--concurrency", "2", "--lease", "2", "--max-body-size", "3000000"]
    options += ["--grace", "5"]  # a slow task some test left running must not hold the stop for the default 30 s
    with fresh_broker(request.param, tmp_path_factory) as url, module_server(tmp_path_factory, url, *options) as server:
        yield server


@pytest.fixture
def runtime_base(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A runtime base of this test's own (worker scratch, uploads, sockets: kept short), inherited by its processes."""
    base = Path(tempfile.mkdtemp(prefix="ts-", dir="/tmp"))
    monkeypatch.setenv("TASKSERVE_RUNTIME_DIR", str(base))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start ``taskserve serve`` with the given options; everything started is stopped afterwards."""
    servers: list[Server] = []

    def make(
        broker: str,
        *options: str,
        workers: int | None = 1,
        service: str = SERVICE,
        start: bool = True,
        port: int | None = None,
    ) -> Server:
        port = port or free_port()
        args = [sys.executable, "-m", "taskserve", "serve", service, "--port", str(port), "--broker", broker]
        if workers is not None:  # None: the service's own count (or its GPUs) decides
            args += ["--workers", str(workers)]
        args += ["--lease", "2", "--grace", "5", *options]
        server = Server(args, port, tmp_path / f"server-{len(servers)}.log", tagged_env(uuid.uuid4().hex))
        servers.append(server)
        return server.start() if start else server

    yield make
    errors = []
    for server in servers:
        try:
            server.stop()
        except AssertionError as exc:
            errors.append(exc)
    for server in servers:
        assert_none_left(server.tag)
    if errors:
        raise errors[0]


class RedisServer:
    """A Redis server of one test's own, which the test may stop and start again.

    With ``appendonly``, it keeps every write in an fsynced log in ``directory``, as a
    production Redis that must not lose accepted tasks across a restart would.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        if self.directory is not None:
            args += ["--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent)
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private, persistent Redis (AOF, fsync always) that a test may restart."""
    import shutil

    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("This test needs the redis-server program, and CI=true needs it.")
        pytest.skip("This test needs the redis-server program, to restart a server of its own.")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


_VALID_OPENAPI: set[str] = set()


def validate_openapi(document: dict[str, Any]) -> None:
    """openapi_spec_validator's check, once per distinct document in a run: it takes seconds on
    ours, and several tests check the same document served by different servers."""
    import hashlib
    import json

    from openapi_spec_validator import validate

    key = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
    if key not in _VALID_OPENAPI:
        validate(document)  # type: ignore[arg-type]
        _VALID_OPENAPI.add(key)
