"""One client per system, behind the same five calls, so the load generator treats all alike.

`HttpDriver` speaks the task API that taskserve, BentoML and the ceiling share, over one
keep-alive connection (standard library only, cheap per request).
`CeleryDriver` uses Celery's own Python client against Redis.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from typing import Any
from urllib.parse import quote, urlsplit

PENDING, RUNNING, SUCCESS, FAILURE, CANCELLED = "pending", "in_progress", "success", "failure", "cancelled"
TERMINAL = {SUCCESS, FAILURE, CANCELLED}

# Every system's status words, mapped onto taskserve's.
STATUS_WORDS = {
    "pending": PENDING,
    "in_progress": RUNNING,
    "success": SUCCESS,
    "failure": FAILURE,
    "cancelled": CANCELLED,
    "completed": SUCCESS,  # BentoML
    "failed": FAILURE,
    "canceled": CANCELLED,
    "PENDING": PENDING,  # Celery
    "RECEIVED": PENDING,
    "RETRY": PENDING,
    "STARTED": RUNNING,
    "SUCCESS": SUCCESS,
    "FAILURE": FAILURE,
    "REVOKED": CANCELLED,
}

IDLE_REUSE_S = 4.0  # a connection idle longer than this is replaced before the next request

# The fields of a status answer worth keeping, whichever system gave them.
INFO_FIELDS = ("attempts", "started_at", "executed_at", "completed_at", "error")


class DriverError(Exception):
    pass


class HttpDriver:
    """A minimal HTTP/1.1 keep-alive client: `http.client` costs several times more CPU per
    request, and on a 2-core machine the load generator's CPU is taken from the system measured."""

    def __init__(self, url: str, timeout: float = 60.0, options: str = "", keyed: bool = False) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        # taskserve's submit options, as a query string for every submit, and whether each
        # submit carries an Idempotency-Key of its own (the "options in use" variant).
        self.options = f"?{options}" if options else ""
        self.keyed = keyed
        self._sock: socket.socket | None = None
        self._buf = b""
        self._used = 0.0

    def connect(self) -> None:
        self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(self, method: str, path: str, body: Any = None, extra: str = "") -> tuple[int, str, bytes]:
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{extra}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        # A GET may be sent again on a fresh connection (the server may have closed an idle
        # one); a POST never is, so a submit is never duplicated by the load generator.
        if self._sock is not None and time.monotonic() - self._used > IDLE_REUSE_S:
            self.close()  # servers drop idle keep-alive connections (uvicorn after 5 s)
        for attempt in range(2 if method == "GET" else 1):
            if self._sock is None:
                self.connect()
            self._used = time.monotonic()
            try:
                self._sock.sendall(head.encode() + b"\r\n" + payload)  # type: ignore[union-attr]
                return self._read_response()
            except OSError:
                self.close()
                if attempt or method != "GET":
                    raise
        raise AssertionError("unreachable")

    def _read_until(self, marker: bytes) -> bytes:
        while (end := self._buf.find(marker)) < 0:
            self._fill()
        line, self._buf = self._buf[:end], self._buf[end + len(marker) :]
        return line

    def _read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _fill(self) -> None:
        chunk = self._sock.recv(262144)  # type: ignore[union-attr]
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        self._buf += chunk

    def _read_response(self) -> tuple[int, str, bytes]:
        lines = self._read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if "content-length" in headers:
            data = self._read_exactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int(self._read_until(b"\r\n").split(b";")[0], 16):
                parts.append(self._read_exactly(size + 2)[:-2])
            while self._read_until(b"\r\n"):  # trailers, up to the empty line
                pass
            data = b"".join(parts)
        else:
            raise DriverError(f"Cannot frame a response without a length: {lines[0]!r}.")
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers.get("content-type", ""), data

    def _json(self, method: str, path: str, body: Any = None, extra: str = "") -> Any:
        status, _, data = self.request(method, path, body, extra)
        if status != 200:
            raise DriverError(f"{method} {path} answered {status}: {data[:200]!r}")
        return json.loads(data)

    def _key(self) -> str:
        return f"Idempotency-Key: {uuid.uuid4().hex}\r\n" if self.keyed else ""

    def submit(self, task: str, args: dict) -> str:
        return self._json("POST", f"/{task}/submit{self.options}", args, self._key())["task_id"]

    def submit_many(self, task: str, items: list[dict]) -> list[str]:
        answer = self._json("POST", f"/{task}/submit_many{self.options}", items, self._key())
        return [t["task_id"] for t in answer["tasks"]]

    def status(self, task: str, task_id: str) -> tuple[str, dict]:
        return _normalise(self._json("GET", f"/{task}/status?task_id={quote(task_id)}"))

    def wait(self, task: str, task_id: str, timeout: float) -> tuple[str, dict]:
        return _normalise(self._json("GET", f"/{task}/wait?task_id={quote(task_id)}&timeout={timeout:g}"))

    def result(self, task: str, task_id: str) -> Any:
        status, content_type, data = self.request("GET", f"/{task}/get?task_id={quote(task_id)}")
        if status != 200:
            raise DriverError(f"get {task_id} answered {status}: {data[:200]!r}")
        return data if content_type.startswith("image/") else json.loads(data)


def _normalise(body: dict) -> tuple[str, dict]:
    word = STATUS_WORDS.get(body.get("status", ""), body.get("status", "?"))
    return word, {k: body[k] for k in INFO_FIELDS if body.get(k) is not None}


class CeleryDriver:
    def __init__(self, redis_url: str) -> None:
        os.environ["BENCH_CELERY_REDIS"] = redis_url
        from bench.peers.celery_app import app

        self.app = app

    def connect(self) -> None:
        self.app.backend.client.ping()
        with self.app.producer_or_acquire() as producer:
            producer.connection.ensure_connection()

    def close(self) -> None:
        pass

    def submit(self, task: str, args: dict) -> str:
        return self.app.send_task(task, kwargs=args).id

    def submit_many(self, task: str, items: list[dict]) -> list[str]:
        with self.app.producer_or_acquire() as producer:
            return [self.app.send_task(task, kwargs=args, producer=producer).id for args in items]

    def status(self, task: str, task_id: str) -> tuple[str, dict]:
        meta = self.app.backend.get_task_meta(task_id)
        done = meta.get("date_done")
        info = {"completed_at": done if isinstance(done, str) else done.isoformat()} if done else {}
        if meta["status"] == "FAILURE":
            info["error"] = repr(meta.get("result"))
        return STATUS_WORDS.get(meta["status"], meta["status"]), info

    def wait(self, task: str, task_id: str, timeout: float) -> tuple[str, dict]:
        # Celery's own way to wait: AsyncResult.get, which listens on Redis pub/sub.
        self.app.AsyncResult(task_id).get(timeout=timeout, propagate=False, disable_sync_subtasks=False)
        return self.status(task, task_id)

    def result(self, task: str, task_id: str) -> Any:
        value = self.app.AsyncResult(task_id).get(timeout=10)
        return base64.b64decode(value) if task == "image" else value

    def prefill(self, n: int) -> None:
        """Store `n` finished noop results the way the Redis backend stores them, in pipelines."""
        backend, now = self.app.backend, time.strftime("%Y-%m-%dT%H:%M:%S")
        pipe = backend.client.pipeline(transaction=False)
        for i in range(n):
            task_id = f"prefill-{i}"
            meta = {
                "status": "SUCCESS",
                "result": i,
                "traceback": None,
                "children": [],
                "date_done": now,
                "task_id": task_id,
            }
            pipe.set(backend.get_key_for_task(task_id), backend.encode(meta), ex=86400)
            if i % 5000 == 4999:
                pipe.execute()
        pipe.execute()


def make_driver(spec: dict) -> HttpDriver | CeleryDriver:
    if spec["kind"] == "celery":
        return CeleryDriver(spec["redis"])
    return HttpDriver(spec["url"], options=spec.get("options", ""), keyed=spec.get("keyed", False))
