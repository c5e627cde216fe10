"""The task lifecycle of SPEC §7 on each broker: TTL, deadlines, idempotency keys, automatic and
manual retries, concurrency caps, back-pressure and the queue position.

The store-level rules run against the in-process app and queue (so a test can step the expiry
sweep and look at the store); what needs workers runs against a real ``taskserve serve``.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

import taskserve
from taskserve.queue import Queue
from taskserve.server import create_app
from taskserve.service import load_service

from .conftest import SERVICE, Server, validate_openapi


def parse(ts: str) -> float:
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


class App:
    """The app in process over a fresh queue, with no workers: tasks stay where a test puts them."""

    def __init__(self, queue: Queue, http: httpx.AsyncClient) -> None:
        self.queue = queue
        self.http = http

    async def submit(self, route: str, body: object, **params: str) -> httpx.Response:
        return await self.http.post(f"{route}/submit", params=params, json=body)

    async def status(self, route: str, task_id: str) -> dict[str, object]:
        answer = await self.http.get(f"{route}/status", params={"task_id": task_id})
        assert answer.status_code == 200, answer.text
        data: dict[str, object] = answer.json()
        return data


@pytest.fixture
async def app(broker: str) -> AsyncIterator[App]:
    queue = Queue.from_url(broker)
    await queue.connect()
    asgi = create_app(load_service(SERVICE), queue, maintenance=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://test") as http:
        yield App(queue, http)
    await queue.close()


# -- TTL and deadlines -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_task_not_started_within_its_ttl_expires_and_never_runs(app: App) -> None:
    answer = await app.submit("/add", {"a": 1}, ttl="0.3")
    task_id = answer.json()["task_id"]
    status = await app.status("/add", task_id)
    assert status["expires_at"] is not None and parse(str(status["expires_at"])) > time.time()
    await asyncio.sleep(0.4)
    # Past its TTL no worker may take it, even before the sweep has ended it.
    assert await app.queue.claim(["/add"], "w1") == []
    assert await app.queue.expire() == 1
    status = await app.status("/add", task_id)
    assert status["status"] == "failure" and status["attempts"] == 0
    assert [e["type"] for e in status["errors"]] == ["Expired"]  # type: ignore[union-attr]
    assert str(status["error"]).startswith("Expired")


@pytest.mark.anyio
async def test_a_ttl_counts_from_when_a_delayed_task_falls_due(app: App) -> None:
    task_id = (await app.submit("/add", {"a": 1}, delay="0.4", ttl="5")).json()["task_id"]
    await asyncio.sleep(0.5)
    claims = await app.queue.claim(["/add"], "w1")
    assert [c.id for c in claims] == [task_id]


@pytest.mark.anyio
async def test_a_deadline_ends_a_queued_task_and_takes_a_running_one_from_its_worker(app: App) -> None:
    queued = (await app.http.post("/add/submit", headers={"Cancel-After": "0.3"}, json={"a": 1})).json()["task_id"]
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=0.3)
    running = (await app.submit("/echo", {"text": "x"}, deadline=soon.isoformat())).json()["task_id"]
    [claim] = await app.queue.claim(["/echo"], "w1")
    assert claim.id == running and claim.deadline is not None and abs(claim.deadline - soon.timestamp()) < 0.01
    stopped: list[str] = []
    app.queue.cancel_listeners.append(stopped.append)
    app.queue.listen_for_cancel()
    await asyncio.sleep(0.4)
    assert await app.queue.expire() == 2
    for route, task_id in (("/add", queued), ("/echo", running)):
        status = await app.status(route, task_id)
        assert status["status"] == "failure", status
        assert [e["type"] for e in status["errors"]] == ["DeadlineExceeded"]  # type: ignore[union-attr]
    # The worker's late report is refused: the deadline's failure stands.
    from taskserve._types import Outcome, TaskStatus

    assert await app.queue.finish([Outcome(claim.id, claim.token, TaskStatus.SUCCESS, result=b'"x"')]) == [False]
    deadline = time.monotonic() + 5
    while running not in stopped and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert running in stopped  # the holder was told to stop, as for a cancel


@pytest.mark.anyio
async def test_bad_lifecycle_options_are_refused_by_name(app: App) -> None:
    cases: list[tuple[dict[str, str], dict[str, str], list[str]]] = [
        ({"ttl": "0"}, {}, ["query", "ttl"]),
        ({"deadline": "soon"}, {}, ["query", "deadline"]),
        ({}, {"Cancel-After": "-3"}, ["header", "Cancel-After"]),
        ({}, {"Cancel-After": "ten"}, ["header", "Cancel-After"]),
        ({"idempotency_key": "x" * 300}, {}, ["query", "idempotency_key"]),
        ({}, {"Idempotency-Key": "tab\there"}, ["header", "Idempotency-Key"]),
        ({"idempotency_key": "a"}, {"Idempotency-Key": "b"}, ["query", "idempotency_key"]),
        ({"webhook": "ftp://example.com/hook"}, {}, ["query", "webhook"]),
    ]
    for params, headers, loc in cases:
        answer = await app.http.post("/add/submit", params=params, headers=headers, json={"a": 1})
        assert answer.status_code == 422, (params, headers, answer.text)
        assert loc in [d["loc"] for d in answer.json()["detail"]], answer.json()
        assert loc[1] in answer.json()["error"]
    listed, _ = await app.queue.list(limit=10)
    assert listed == []


# -- idempotency -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_idempotency_key_answers_the_same_task_and_refuses_other_arguments(app: App) -> None:
    first = await app.http.post("/add/submit", headers={"Idempotency-Key": "order-17"}, json={"a": 1, "b": 2})
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    again = await app.submit("/add", {"a": 1, "b": 2}, idempotency_key="order-17")
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["task_id"] == first.json()["task_id"]
    other = await app.submit("/add", {"a": 5}, idempotency_key="order-17")
    assert other.status_code == 409, other.text
    assert other.json()["task_id"] == first.json()["task_id"] and "order-17" in other.json()["error"]
    # The key is per route: the same key on another route is another request.
    elsewhere = await app.submit("/echo", {"text": "x"}, idempotency_key="order-17")
    assert elsewhere.status_code == 200 and elsewhere.json()["task_id"] != first.json()["task_id"]
    listed, _ = await app.queue.list(limit=10)
    assert len(listed) == 2


@pytest.mark.anyio
async def test_concurrent_submits_with_one_key_make_one_task(app: App) -> None:
    answers = await asyncio.gather(*(app.submit("/add", {"a": 3}, idempotency_key="race") for _ in range(20)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["task_id"] for a in answers}) == 1
    assert sum(1 for a in answers if "idempotent-replayed" not in a.headers) == 1
    listed, _ = await app.queue.list(route="/add", limit=50)
    assert len(listed) == 1


@pytest.mark.anyio
async def test_a_repeated_submit_many_with_a_key_finds_every_task_again(app: App) -> None:
    items = [{"a": 1}, {"a": 2}, {"a": 3}]
    first = await app.http.post("/add/submit_many", params={"idempotency_key": "batch-1"}, json=items)
    again = await app.http.post("/add/submit_many", params={"idempotency_key": "batch-1"}, json=items)
    assert first.status_code == again.status_code == 200
    assert [t["task_id"] for t in again.json()["tasks"]] == [t["task_id"] for t in first.json()["tasks"]]
    assert again.headers["idempotent-replayed"] == "true"
    changed = await app.http.post("/add/submit_many", params={"idempotency_key": "batch-1"}, json=[{"a": 9}])
    assert changed.status_code == 409
    listed, _ = await app.queue.list(limit=10)
    assert len(listed) == 3


# -- back-pressure and position --------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_full_queue_answers_429_with_retry_after_and_queues_nothing(app: App) -> None:
    ids = [(await app.submit("/bounded", {})).json()["task_id"] for _ in range(3)]
    assert len(ids) == 3
    refused = await app.submit("/bounded", {})
    assert refused.status_code == 429, refused.text
    body = refused.json()
    assert body["retry_after"] >= 1 and int(refused.headers["retry-after"]) == body["retry_after"]
    assert "max_queue" in body["error"]
    too_many = await app.http.post("/bounded/submit_many", json=[{}])
    assert too_many.status_code == 429
    listed, _ = await app.queue.list(route="/bounded", limit=10)
    assert len(listed) == 3
    # Room again once one is taken: the bound is on pending tasks, not on the route's history.
    assert len(await app.queue.claim(["/bounded"], "w1")) == 1
    assert (await app.submit("/bounded", {})).status_code == 200


@pytest.mark.anyio
async def test_max_queue_applies_to_every_route_from_the_server_option(broker: str, tmp_path: Path) -> None:
    queue = Queue.from_url(broker)
    await queue.connect()
    asgi = create_app(load_service(SERVICE), queue, maintenance=False, max_queue=1)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://test") as http:
        assert (await http.post("/echo/submit", json={"text": "a"})).status_code == 200
        assert (await http.post("/echo/submit", json={"text": "b"})).status_code == 429
        # A task's own max_queue wins over the server's.
        for _ in range(3):
            assert (await http.post("/bounded/submit", json={})).status_code == 200
    await queue.close()


@pytest.mark.anyio
async def test_a_pending_task_knows_its_place_in_the_queue(app: App) -> None:
    ids = [(await app.submit("/add", {"a": i})).json()["task_id"] for i in range(3)]
    assert [(await app.status("/add", i))["position"] for i in ids] == [0, 1, 2]
    urgent = (await app.submit("/add", {"a": 9}, priority="5")).json()["task_id"]
    assert (await app.status("/add", urgent))["position"] == 0
    assert [(await app.status("/add", i))["position"] for i in ids] == [1, 2, 3]
    later = (await app.submit("/add", {"a": 9}, delay="60")).json()["task_id"]
    assert (await app.status("/add", later))["position"] == 4
    await app.queue.claim(["/add"], "w1")
    assert (await app.status("/add", urgent))["position"] is None  # running: no place in the queue
    assert (await app.status("/add", ids[0]))["position"] == 0


@pytest.mark.anyio
async def test_a_webhook_is_stored_with_the_task(app: App) -> None:
    task_id = (await app.submit("/add", {"a": 1}, webhook="https://example.com/hook?x=1")).json()["task_id"]
    status = await app.status("/add", task_id)
    assert status["webhook"] == {
        "url": "https://example.com/hook?x=1",
        "state": "pending",
        "attempts": 0,
        "last_error": None,
    }


# -- with workers ----------------------------------------------------------------------------------


def test_automatic_retries_back_off_and_keep_every_error(served: Server, tmp_path: Path) -> None:
    with taskserve.SyncHTTPClient(served.url) as client:
        task = client.flaky_connection.submit(log=str(tmp_path / "runs.log"), failures=2)
        assert task.get(timeout=30) == 3
        status = task.status()
    errors = status["errors"]
    assert [(e["attempt"], e["type"]) for e in errors] == [(1, "ConnectionError"), (2, "ConnectionError")]
    assert errors[1]["message"] == "run 2 failed"
    # retry_delay=0.2, retry_backoff=2: the second retry waits about twice the first (±10 %).
    assert parse(errors[1]["at"]) - parse(errors[0]["at"]) >= 0.2 * 0.9
    assert parse(status["started_at"]) - parse(errors[1]["at"]) >= 0.4 * 0.9
    assert status["attempts"] == 3 and status["status"] == "success"


def test_a_manual_retry_takes_overrides_validated_like_a_submit(served: Server) -> None:
    with taskserve.SyncHTTPClient(served.url) as client:
        first = client.add.submit(a=1, b=2)
        assert first.get(timeout=30) == 3
        again = first.retry(b=10)
        assert again.id != first.id and again.get(timeout=30) == 11
        assert again.status()["retry_of"] == first.id
        plain = first.retry()
        assert plain.get(timeout=30) == 3 and plain.status()["retry_of"] == first.id
        with pytest.raises(taskserve.ValidationFailed) as refused:
            first.retry(b="many")
        assert "b" in str(refused.value)
    answer = httpx.post(
        f"{served.url}/add/retry",
        params={"task_id": first.id},
        content=b"[1]",
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 422 and "object" in answer.json()["error"]


@pytest.mark.anyio
async def test_the_async_client_retries_with_overrides_and_sees_queue_full(served: Server) -> None:
    async with taskserve.AsyncHTTPClient(served.url) as client:
        first = await client.add.submit(a=2, b=2)
        assert await first.get(timeout=30) == 4
        again = await first.retry(a=5)
        assert await again.get(timeout=30) == 7 and (await again.status())["retry_of"] == first.id
        keyed = client.add.options(idempotency_key="k-async")
        one, two = await keyed.submit(a=1), await keyed.submit(a=1)
        assert one.id == two.id
        with pytest.raises(taskserve.IdempotencyConflict) as conflict:
            await keyed.submit(a=2)
        assert conflict.value.task_id == one.id


def test_a_deadline_stops_a_running_task_in_its_worker(served: Server) -> None:
    with taskserve.SyncHTTPClient(served.url) as client:
        started = time.monotonic()
        for route in (client.slow_async, client.slow_sync):
            task = route.options(deadline=1.0).submit(seconds=30)
            assert task.wait(timeout=30) is taskserve.TaskStatus.FAILURE
            assert task.status()["errors"][-1]["type"] == "DeadlineExceeded"
        assert time.monotonic() - started < 15
    answer = httpx.post(f"{served.url}/slow_async/submit", headers={"Cancel-After": "0.5"}, json={"seconds": 30})
    task_id = answer.json()["task_id"]
    status = httpx.get(f"{served.url}/slow_async/wait", params={"task_id": task_id, "timeout": 20}).json()
    assert status["status"] == "failure" and status["errors"][-1]["type"] == "DeadlineExceeded"


def test_a_ttl_fails_a_task_no_worker_reached(served: Server) -> None:
    with taskserve.SyncHTTPClient(served.url) as client:
        blockers = [client.slow_async.submit(seconds=3) for _ in range(4)]  # every slot busy
        time.sleep(0.3)
        late = client.slow_async.options(ttl=0.5).submit(seconds=0)
        assert late.wait(timeout=20) is taskserve.TaskStatus.FAILURE
        status = late.status()
        assert status["errors"][-1]["type"] == "Expired" and status["started_at"] is None
        for blocker in blockers:
            blocker.cancel()


def test_a_concurrency_cap_holds_across_workers(served: Server) -> None:
    """Two workers of two slots each, four slots in all: the route's cap of two still holds."""
    with taskserve.SyncHTTPClient(served.url) as client:
        tasks = [client.capped.submit(seconds=0.4) for _ in range(6)]
        assert [t.get(timeout=60) for t in tasks] == ["done"] * 6
        spans = [(parse(s["started_at"]), parse(s["completed_at"])) for s in (t.status() for t in tasks)]
    most = max(sum(1 for s, e in spans if s <= moment < e) for moment, _ in spans)
    assert most == 2, spans  # never more than the cap, and the cap was reached


def test_the_openapi_document_names_every_option_header_and_answer() -> None:

    from taskserve.server.openapi import openapi_document

    docs = openapi_document(load_service(SERVICE))  # what /docs.json serves
    validate_openapi(docs)
    submit = docs["paths"]["/add/submit"]["post"]
    named = {(p["in"], p["name"]) for p in submit["parameters"]}
    for option in ("priority", "delay", "run_at", "ttl", "timeout", "deadline", "idempotency_key", "webhook", "tag"):
        assert ("query", option) in named
    assert ("header", "Cancel-After") in named
    # The header form of the key is described with the option: no schema can say "equal to it if both".
    assert "Idempotency-Key" in next(p for p in submit["parameters"] if p["name"] == "idempotency_key")["description"]
    assert {"409", "429"} <= set(submit["responses"]) and "Idempotent-Replayed" in submit["responses"]["200"]["headers"]
    assert "requestBody" in docs["paths"]["/add/retry"]["post"]
    assert "position" in docs["components"]["schemas"]["TaskStatus"]["properties"]


@pytest.mark.anyio
async def test_map_flows_through_a_bounded_queue_without_a_429_reaching_the_caller(served: Server) -> None:
    """/bounded holds at most 3 pending tasks; map() of many items backs off and resends."""
    items = [{"seconds": 0.01}] * 40
    with taskserve.SyncHTTPClient(served.url) as client:
        assert list(client.bounded.map(items)) == ["done"] * 40
    async with taskserve.AsyncHTTPClient(served.url) as aclient:
        assert [r async for r in aclient.bounded.map(items)] == ["done"] * 40
        with pytest.raises(taskserve.QueueFull) as full:
            await asyncio.gather(*(aclient.bounded.submit(seconds=2) for _ in range(12)))
        assert full.value.retry_after is not None and full.value.retry_after >= 1


# -- what review found ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_retried_task_is_past_its_ttl_only_while_it_never_started(app: App) -> None:
    from taskserve._types import Outcome, TaskStatus

    task_id = (await app.submit("/add", {"a": 1}, ttl="0.3")).json()["task_id"]
    [claim] = await app.queue.claim(["/add"], "w1")
    failed = Outcome(claim.id, claim.token, TaskStatus.FAILURE, error="ConnectionError: down", retry=True)
    assert await app.queue.finish([failed]) == [True]
    await asyncio.sleep(0.4)
    assert await app.queue.expire() == 0
    [again] = await app.queue.claim(["/add"], "w1")
    assert again.id == task_id and again.attempts == 2


@pytest.mark.anyio
async def test_a_capped_route_does_not_hold_back_the_others_in_one_claim(app: App) -> None:
    await app.http.post("/add/submit_many", json=[{"a": i} for i in range(8)])
    await app.submit("/capped", {"seconds": 1})
    app.queue.caps["/capped"] = 1
    claims = await app.queue.claim(["/add", "/capped"], "w1", limit=8)
    assert len(claims) == 8
    claims = await app.queue.claim(["/add", "/capped"], "w1", limit=8)
    assert [c.route for c in claims] == ["/capped"]
    assert await app.queue.claim(["/capped"], "w2", limit=8) == []  # its one slot is taken


@pytest.mark.anyio
async def test_a_manual_retry_obeys_the_routes_max_queue(app: App) -> None:
    first = (await app.submit("/bounded", {})).json()["task_id"]
    await app.http.put("/bounded/cancel", params={"task_id": first})
    for _ in range(3):
        assert (await app.submit("/bounded", {})).status_code == 200
    refused = await app.http.post("/bounded/retry", params={"task_id": first})
    assert refused.status_code == 429 and refused.json()["retry_after"] >= 1


@pytest.mark.anyio
async def test_a_deadline_before_the_start_ends_the_task_unrun(app: App) -> None:
    """Accepted, as /docs.json admits it (tests/test_fuzz.py): it fails DeadlineExceeded, never running."""
    answer = await app.http.post(
        "/add/submit", params={"delay": "60", "deadline": "2020-01-01T00:00:00Z"}, json={"a": 1}
    )
    assert answer.status_code == 200
    await app.queue.expire()
    status = (await app.http.get("/add/status", params={"task_id": answer.json()["task_id"]})).json()
    assert status["status"] == "failure" and status["error"].startswith("DeadlineExceeded")


@pytest.mark.anyio
async def test_a_direct_call_replaying_a_key_never_cancels_the_task_it_found(broker: str) -> None:
    queue = Queue.from_url(broker)
    await queue.connect()
    asgi = create_app(load_service(SERVICE), queue, maintenance=False, call_timeout=0.3)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://test") as http:
        made = await http.post("/add/submit", headers={"Idempotency-Key": "call-1"}, json={"a": 1})
        gave_up = await http.post("/add", headers={"Idempotency-Key": "call-1"}, json={"a": 1}, timeout=30)
        assert gave_up.status_code == 504 and gave_up.json()["task_id"] == made.json()["task_id"]
        status = (await http.get("/add/status", params={"task_id": made.json()["task_id"]})).json()
        assert status["status"] == "pending"  # still there for whoever made it
    await queue.close()


def test_the_purge_reads_an_index(tmp_path: Path) -> None:
    import sqlite3

    from taskserve.queue._sqlite_schema import migrate

    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    migrate(conn)
    plan = conn.execute(
        "EXPLAIN QUERY PLAN SELECT rowid FROM tasks INDEXED BY tasks_purge WHERE purge_at < 1 LIMIT 2000"
    ).fetchall()
    assert any("tasks_purge" in str(row) for row in plan)


def test_map_with_an_idempotency_key_keys_every_item_of_every_chunk(
    served: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskserve.client import _map

    monkeypatch.setattr(_map, "CHUNK", 10)
    items = [{"a": i, "b": 0} for i in range(25)]
    with taskserve.SyncHTTPClient(served.url) as client:
        keyed = client.add.options(idempotency_key=f"map-{time.time()}")
        assert list(keyed.map(items)) == list(range(25))
        assert list(keyed.map(items)) == list(range(25))  # the same run again: every task found again
