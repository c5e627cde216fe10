"""Webhooks (SPEC §8) on each broker: signed deliveries from the store's outbox, retried with
back-off, fenced by their attempt number, refused hosts, and a delivery that outlives a kill -9.

The receiver is a small HTTP server in a thread of the test, answering as each test scripts it.
Store-level tests end tasks by hand and run the deliverer in process; the kill test runs the
real ``taskserve serve``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

import taskserve
from taskserve._types import NewTask, Outcome, Result, TaskRecord, TaskStatus
from taskserve.queue import Queue
from taskserve.server import create_app
from taskserve.service import load_service
from taskserve.webhooks import Deliverer, payload, sign

from .conftest import SERVICE, ServerFactory, free_port, wait_until

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers each POST with the next of ``codes`` (the last one once they run out) and keeps it."""

    port: int
    codes: list[int] = field(default_factory=lambda: [200])
    got: list[Received] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.got.append(Received({k.lower(): v for k, v in self.headers.items()}, body))
                code = receiver.codes[min(len(receiver.got), len(receiver.codes)) - 1]
                self.send_response(code)
                self.send_header("content-length", "4")
                self.end_headers()
                self.wfile.write(b"nope" if code >= 300 else b"okay")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(free_port())
    yield r
    r.stop()


@pytest.fixture
async def queue(broker: str) -> AsyncIterator[Queue]:
    q = Queue.from_url(broker)
    await q.connect()
    yield q
    await q.close()


async def ended(queue: Queue, webhook: str | None, result: bytes = b"3") -> str:
    """A task of /add with this webhook, taken and ended as a success by a make-believe worker."""
    [record] = await queue.enqueue_many([NewTask("/add", b'{"a": 2}', webhook=webhook)])
    [claim] = await queue.claim(["/add"], "w1")
    outcome = Outcome(claim.id, claim.token, TaskStatus.SUCCESS, result=result, content_type="application/json")
    assert await queue.finish([outcome]) == [True]
    return record.id


@contextlib.asynccontextmanager
async def delivering(queue: Queue, **options: Any) -> AsyncIterator[Deliverer]:
    deliverer = Deliverer(queue, **{"secret": SECRET, "retry_delay": 0.05, **options})
    task = asyncio.create_task(deliverer.run())
    try:
        yield deliverer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def settled(queue: Queue, task_id: str, timeout: float = 15.0) -> TaskRecord:
    deadline = time.monotonic() + timeout
    while (record := await queue.get(task_id)).webhook_state is None:
        assert time.monotonic() < deadline, f"the webhook of {task_id} was not settled within {timeout}s"
        await asyncio.sleep(0.02)
    return record


# -- deliveries, in process ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_failed_try_is_retried_with_the_same_id_and_the_delivery_is_signed(
    queue: Queue, receiver: Receiver
) -> None:
    receiver.codes = [500, 200]
    receiver.start()
    task_id = await ended(queue, receiver.url)
    async with delivering(queue):
        record = await settled(queue, task_id)
    assert record.status is TaskStatus.SUCCESS
    assert record.webhook_json() == {
        "url": receiver.url,
        "state": "delivered",
        "attempts": 2,
        "last_error": "HTTP 500: nope",
    }
    first, second = receiver.got
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == f"msg_{task_id}"
    body = taskserve.verify_webhook(SECRET, second.headers, second.body)
    assert body == {
        "type": "task.completed",
        "task_id": task_id,
        "route": "/add",
        "status": "success",
        "completed_at": record.to_json()["completed_at"],
        "error": None,
        "result": 3,
        "result_url": f"/add/get?task_id={task_id}",
    }


@pytest.mark.anyio
async def test_a_delivery_that_fails_every_try_ends_failed(queue: Queue, receiver: Receiver) -> None:
    receiver.codes = [503]
    receiver.start()
    task_id = await ended(queue, receiver.url)
    async with delivering(queue, tries=3):
        record = await settled(queue, task_id)
    assert (record.webhook_state, record.webhook_attempts, record.webhook_error) == ("failed", 3, "HTTP 503: nope")
    assert len(receiver.got) == 3
    assert record.status is TaskStatus.SUCCESS  # the task's own status never changes for its webhook


@pytest.mark.anyio
async def test_an_unreachable_receiver_is_an_error_of_the_try(queue: Queue) -> None:
    task_id = await ended(queue, f"http://127.0.0.1:{free_port()}/hook")
    async with delivering(queue, tries=1):
        record = await settled(queue, task_id)
    assert record.webhook_state == "failed" and record.webhook_error and "ConnectError" in record.webhook_error


@pytest.mark.anyio
async def test_without_a_secret_deliveries_go_unsigned(queue: Queue, receiver: Receiver) -> None:
    receiver.start()
    task_id = await ended(queue, receiver.url)
    async with delivering(queue, secret=None):
        await settled(queue, task_id)
    [got] = receiver.got
    assert "webhook-signature" not in got.headers and got.headers["webhook-id"] == f"msg_{task_id}"


@pytest.mark.anyio
async def test_a_task_that_fails_or_is_cancelled_is_delivered_too(queue: Queue, receiver: Receiver) -> None:
    receiver.start()
    cancelled = (await queue.enqueue(NewTask("/add", b'{"a": 1}', webhook=receiver.url))).id
    await queue.cancel(cancelled)
    failed = (await queue.enqueue(NewTask("/add", b'{"a": 1}', webhook=receiver.url))).id
    [claim] = await queue.claim(["/add"], "w1")
    await queue.finish([Outcome(claim.id, claim.token, TaskStatus.FAILURE, error="ValueError: boom")])
    async with delivering(queue):
        for task_id in (cancelled, failed):
            await settled(queue, task_id)
    bodies = {b["task_id"]: b for b in (json.loads(got.body) for got in receiver.got)}
    assert (bodies[cancelled]["status"], bodies[cancelled]["error"]) == ("cancelled", None)
    assert (bodies[failed]["status"], bodies[failed]["error"], bodies[failed]["result"]) == (
        "failure",
        "ValueError: boom",
        None,
    )


@pytest.mark.anyio
async def test_only_the_latest_taker_of_a_delivery_records_its_try(queue: Queue) -> None:
    task_id = await ended(queue, "http://127.0.0.1:9/hook")
    await ended(queue, None)  # no webhook: never due
    assert await queue.take_webhooks(10, 0.05, 6) == [(task_id, 1)]
    assert await queue.take_webhooks(10, 0.05, 6) == []  # leased
    await asyncio.sleep(0.1)  # its taker died: the lease lapses
    assert await queue.take_webhooks(10, 30, 6) == [(task_id, 2)]
    assert await queue.webhook_result(task_id, 1, None, None) is False
    assert await queue.webhook_result(task_id, 2, None, None) is True
    assert (await queue.get(task_id)).webhook_state == "delivered"
    assert await queue.take_webhooks(10, 30, 6) == []


@pytest.mark.anyio
async def test_a_delivery_whose_takers_all_died_ends_failed(queue: Queue) -> None:
    task_id = await ended(queue, "http://127.0.0.1:9/hook")
    assert await queue.take_webhooks(10, 0.01, 1) == [(task_id, 1)]
    await asyncio.sleep(0.05)
    assert await queue.take_webhooks(10, 0.01, 1) == []
    record = await queue.get(task_id)
    assert record.webhook_state == "failed" and record.webhook_error == "its sender stopped before it had an answer"


def test_a_large_or_binary_result_is_left_to_the_result_url() -> None:
    record = TaskRecord("abc", "/gen", TaskStatus.SUCCESS, created_at=0.0, completed_at=1.0)
    big = Result(json.dumps("x" * 70_000).encode(), "application/json")
    for result in (big, Result(b"\x89PNG", "image/png"), None):
        body = json.loads(payload(record, result, "https://api.example.com/"))
        assert body["result"] is None and body["result_url"] == "https://api.example.com/gen/get?task_id=abc"


# -- verifying -------------------------------------------------------------------------------------


def signed(body: bytes, secret: str = SECRET, at: float | None = None) -> dict[str, str]:
    from taskserve.webhooks import parse_secret

    ts = int(time.time() if at is None else at)
    return {
        "Webhook-Id": "msg_1",
        "Webhook-Timestamp": str(ts),
        "Webhook-Signature": sign(parse_secret(secret), "msg_1", ts, body),
    }


def test_verify_webhook_returns_the_payload_of_a_good_request() -> None:
    body = b'{"type":"task.completed","task_id":"1"}'
    assert taskserve.verify_webhook(SECRET, signed(body), body)["task_id"] == "1"
    assert taskserve.verify_webhook(SECRET, signed(body, at=time.time() - 200), body.decode())["task_id"] == "1"


@pytest.mark.parametrize(
    ("headers", "body", "says"),
    [  # headers are made when the test runs: a timestamp made at collection would be stale by then
        (
            lambda: signed(b"{}", "whsec_" + base64.b64encode(b"another secret, 32 bytes long!!").decode()),
            b"{}",
            "another secret",
        ),
        (lambda: signed(b"{}"), b'{"changed": 1}', "another secret"),
        (lambda: signed(b"{}", at=time.time() - 3600), b"{}", "in the past"),
        (lambda: {"webhook-id": "msg_1"}, b"{}", r"lacks the header\(s\) webhook-timestamp, webhook-signature"),
    ],
)
def test_verify_webhook_refuses_a_forged_changed_stale_or_unsigned_request(
    headers: Callable[[], dict[str, str]], body: bytes, says: str
) -> None:
    with pytest.raises(taskserve.WebhookVerificationError, match=says):
        taskserve.verify_webhook(SECRET, headers(), body)


def test_a_secret_that_is_not_whsec_base64_is_refused() -> None:
    with pytest.raises(ValueError, match="whsec_"):
        taskserve.verify_webhook("whsec_short", signed(b"{}"), b"{}")


# -- the server ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_webhook_allow_refuses_other_hosts_by_name(tmp_path: Any) -> None:
    queue = Queue.from_url(f"sqlite:///{tmp_path}/tasks.db")
    await queue.connect()
    app = create_app(load_service(SERVICE), queue, maintenance=False, webhook_allow=["hooks.example.com"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        refused = await http.post("/add/submit", params={"webhook": "https://evil.example.net/x"}, json={"a": 1})
        allowed = await http.post("/add/submit", params={"webhook": "https://HOOKS.example.com/x"}, json={"a": 1})
    await queue.close()
    assert refused.status_code == 422
    [detail] = refused.json()["detail"]
    assert detail["loc"] == ["query", "webhook"] and "evil.example.net" in detail["msg"]
    assert allowed.status_code == 200


def test_serve_refuses_a_secret_that_is_not_whsec_base64() -> None:
    from click.testing import CliRunner

    from taskserve.cli import cli

    result = CliRunner().invoke(cli, ["serve", SERVICE, "--webhook-secret", "hunter2", "--port", str(free_port())])
    assert result.exit_code == 2 and "--webhook-secret" in result.output and "whsec_" in result.output


@pytest.mark.anyio
async def test_a_server_without_a_secret_warns_once_at_start_up(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    queue = Queue.from_url(f"sqlite:///{tmp_path}/tasks.db")
    app = create_app(load_service(SERVICE), queue)
    async with app.router.lifespan_context(app):
        pass
    assert [r.message for r in caplog.records if "unsigned" in r.message] == [
        "webhooks are sent unsigned: receivers cannot tell them from forgeries. "
        "Give a secret with --webhook-secret or TASKSERVE_WEBHOOK_SECRET (whsec_...)."
    ]


def test_a_delivery_pending_when_the_server_is_killed_is_made_after_a_restart(
    broker: str, make_server: ServerFactory
) -> None:
    port = free_port()
    receiver = Receiver(port)  # not listening yet: every try fails
    options = ["--webhook-secret", SECRET, "--webhook-retry-delay", "1", "--webhook-allow", "127.0.0.1"]
    server = make_server(broker, *options)
    client = server.client()
    task = client.add.options(webhook=receiver.url).submit(a=4)
    assert task.get(timeout=30) == 5

    def webhook() -> dict[str, Any]:
        status: dict[str, Any] = httpx.get(f"{server.url}/tasks/{task.id}", timeout=5).json()["webhook"]
        return status

    wait_until(lambda: webhook()["last_error"], 15)
    assert webhook()["state"] == "pending"
    server.kill_all()
    receiver.start()
    try:
        server = make_server(broker, *options)
        wait_until(lambda: webhook()["state"] == "delivered", 30)
    finally:
        receiver.stop()
    body = taskserve.verify_webhook(SECRET, receiver.got[-1].headers, receiver.got[-1].body)
    assert body["task_id"] == task.id and body["result"] == 5 and body["status"] == "success"
