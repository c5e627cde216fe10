"""Access control (SPEC §10): API keys, task ownership across keys, admin keys, CORS, the clients' api_key."""

from __future__ import annotations

import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

import taskserve
from taskserve.cli import cli
from taskserve.queue import Queue
from taskserve.server.auth import Keys, parse_key

from .conftest import (
    BROKERS,
    SERVICE,
    Server,
    assert_none_left,
    free_port,
    fresh_broker,
    module_server,
    tagged_env,
    validate_openapi,
    wait_until,
)
from .test_queue import OpenQueue, open_queue, redis_prefix, task  # noqa: F401 - fixtures

ALICE, BOB, ADMIN, PLAIN = "alice-secret-1", "bob-secret-22", "ops-secret-333", "plain-secret-4444"
ORIGIN = "https://app.example"


def key(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module", params=BROKERS)
def secured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server per broker with two named keys, an admin key and a plain key (from the environment)."""
    options = ["--workers", "1", "--concurrency", "4", "--lease", "2", "--grace", "1"]
    options += ["--api-key", f"alice={ALICE}", "--api-key", f"bob={BOB}", "--admin-key", f"ops={ADMIN}"]
    options += ["--cors-origin", ORIGIN]
    env = {"TASKSERVE_API_KEYS": PLAIN}
    with (
        fresh_broker(request.param, tmp_path_factory) as url,
        module_server(tmp_path_factory, url, *options, env=env) as server,
    ):
        yield server


def submit(server: Server, secret: str, route: str = "/echo", body: Any = None, **params: str) -> str:
    response = httpx.post(
        f"{server.url}{route}/submit", json=body or {"text": "hi"}, params=params, headers=key(secret)
    )
    assert response.status_code == 200, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def finished(server: Server, secret: str, task_id: str, route: str = "/echo") -> dict[str, Any]:
    params = {"task_id": task_id, "timeout": "20"}
    body: dict[str, Any] = httpx.get(f"{server.url}{route}/wait", params=params, headers=key(secret), timeout=30).json()
    assert body["status"] in ("success", "failure", "cancelled"), body
    return body


def listed(server: Server, secret: str, **params: str) -> list[str]:
    response = httpx.get(f"{server.url}/tasks", params={"limit": "1000", **params}, headers=key(secret))
    assert response.status_code == 200, response.text
    return [t["task_id"] for t in response.json()["tasks"]]


KEYED_ROUTES = [
    ("GET", "/echo/status?task_id=x"),
    ("GET", "/echo/get?task_id=x"),
    ("GET", "/echo/wait?task_id=x&timeout=0"),
    ("GET", "/echo/events?task_id=x"),
    ("GET", "/echo/preview?task_id=x"),
    ("POST", "/echo/submit"),
    ("POST", "/echo/submit_many"),
    ("POST", "/echo/wait_many"),
    ("POST", "/echo/retry?task_id=x"),
    ("POST", "/echo/cancel?task_id=x"),
    ("POST", "/echo"),
    ("GET", "/tasks"),
    ("GET", "/tasks/x"),
    ("GET", "/queues"),
    ("GET", "/workers"),
    ("GET", "/metrics"),
    ("GET", "/schema.json"),
    ("GET", "/docs.json"),
]


def test_every_route_but_the_probes_needs_a_key(secured: Server) -> None:
    with httpx.Client(base_url=secured.url, timeout=10) as http:
        for method, path in KEYED_ROUTES:
            for headers in ({}, key("not-a-key"), {"Authorization": f"Basic {ALICE}"}):
                response = http.request(method, path, headers=headers, json={"text": "hi"})
                assert response.status_code == 401, (method, path, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
                assert "API key" in response.json()["error"]
        # A key sent without its scheme is told how to send it, not that a key is missing.
        for value in (ALICE, f"Bearer\t{ALICE}"):
            response = http.get("/queues", headers={"Authorization": value})
            assert response.status_code == 401 and "holds no API key this server can" in response.json()["error"]
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 200
        assert http.get("/ui").status_code != 401  # the dashboard's page loads, then asks for a key
        assert http.get("/ui/app.js").status_code != 401


def test_bearer_and_x_api_key_both_admit_and_the_schema_names_the_schemes(secured: Server) -> None:
    for headers in (key(ALICE), {"X-API-Key": BOB}, key(PLAIN), key(ADMIN)):
        assert httpx.get(f"{secured.url}/queues", headers=headers).status_code == 200
    docs = httpx.get(f"{secured.url}/docs.json", headers=key(ALICE)).json()
    assert set(docs["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert "401" in docs["paths"]["/echo/submit"]["post"]["responses"]
    assert docs["paths"]["/healthz"]["get"]["security"] == []
    validate_openapi(docs)  # still a valid OpenAPI 3.1 document


def test_another_key_gets_404_from_every_task_route(secured: Server) -> None:
    task_id = submit(secured, ALICE)
    finished(secured, ALICE, task_id)
    not_found = httpx.get(f"{secured.url}/tasks/{'0' * 32}", headers=key(BOB)).json()
    with httpx.Client(base_url=secured.url, headers=key(BOB), timeout=10) as http:
        for method, action in [("GET", "status"), ("GET", "get"), ("GET", "wait"), ("GET", "events"),
                               ("GET", "preview"), ("POST", "retry"), ("POST", "cancel")]:  # fmt: skip
            response = http.request(method, f"/echo/{action}", params={"task_id": task_id, "timeout": "0"})
            assert response.status_code == 404, (action, response.text)
        response = http.get(f"/tasks/{task_id}")
        assert response.status_code == 404
        assert response.json()["error"] == not_found["error"].replace("0" * 32, task_id)  # as an unknown id
        many = http.post("/echo/wait_many", json={"task_ids": [task_id], "timeout": 0}).json()
        assert many["missing"] == [task_id] and many["tasks"] == []
    assert httpx.get(f"{secured.url}/echo/get", params={"task_id": task_id}, headers=key(ALICE)).json() == "hi"


def test_a_listing_shows_only_the_callers_tasks_and_an_admin_sees_all(secured: Server) -> None:
    mine = [submit(secured, ALICE, body={"text": str(i)}) for i in range(3)]
    theirs = submit(secured, BOB)
    for task_id in mine:
        finished(secured, ALICE, task_id)
    assert set(mine) <= set(listed(secured, ALICE)) and theirs not in listed(secured, ALICE)
    assert set(mine).isdisjoint(listed(secured, BOB)) and theirs in listed(secured, BOB)
    assert set(mine).isdisjoint(listed(secured, BOB, route="echo", status="success"))
    assert set(mine) <= set(listed(secured, ALICE, route="echo", status="success"))
    assert {*mine, theirs} <= set(listed(secured, ADMIN))
    # Paging one owner's listing walks only that owner's tasks.
    seen, cursor = [], None
    while True:
        params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{secured.url}/tasks", params=params, headers=key(ALICE)).json()
        seen += [t["task_id"] for t in page["tasks"]]
        if not (cursor := page["next_cursor"]):
            break
    assert set(mine) <= set(seen) and theirs not in seen and len(seen) == len(set(seen))


def test_an_admin_key_reads_and_cancels_anyones_task(secured: Server) -> None:
    task_id = submit(secured, BOB, route="/slow_async", body={"seconds": 30})
    status = httpx.get(f"{secured.url}/slow_async/status", params={"task_id": task_id}, headers=key(ADMIN))
    assert status.status_code == 200
    cancel = httpx.post(f"{secured.url}/slow_async/cancel", params={"task_id": task_id}, headers=key(ADMIN))
    assert cancel.json()["status"] == "cancelled"
    assert finished(secured, BOB, task_id, "/slow_async")["status"] == "cancelled"


def test_a_retry_stays_with_the_owner(secured: Server) -> None:
    task_id = submit(secured, ALICE)
    finished(secured, ALICE, task_id)
    retried = httpx.post(f"{secured.url}/echo/retry", params={"task_id": task_id}, headers=key(ADMIN)).json()
    assert retried["retry_of"] == task_id
    assert retried["task_id"] in listed(secured, ALICE)
    assert retried["task_id"] not in listed(secured, BOB)


def test_idempotency_keys_are_per_owner(secured: Server) -> None:
    idem = uuid.uuid4().hex
    a = submit(secured, ALICE, body={"text": "a"}, idempotency_key=idem)
    b = submit(secured, BOB, body={"text": "b"}, idempotency_key=idem)  # no conflict with alice's
    assert a != b
    assert submit(secured, BOB, body={"text": "b"}, idempotency_key=idem) == b
    assert finished(secured, BOB, b)["status"] == "success"


def test_the_clients_send_their_api_key(secured: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    with taskserve.SyncHTTPClient(secured.url, api_key=ALICE) as client:
        task = client.echo.submit(text="from alice")
        assert task.get(timeout=20) == "from alice"
    with taskserve.SyncHTTPClient(secured.url, api_key=BOB) as client, pytest.raises(taskserve.TaskNotFound):
        taskserve.Task(client.echo, task.id).status()
    with taskserve.SyncHTTPClient(secured.url) as client, pytest.raises(taskserve.AuthenticationError, match="api_key"):
        client.echo.submit(text="x")
    monkeypatch.setenv("TASKSERVE_API_KEY", BOB)
    with taskserve.SyncHTTPClient(secured.url) as client:
        assert client.add(a=1, b=2) == 3


@pytest.mark.anyio
async def test_the_async_client_sends_its_api_key(secured: Server) -> None:
    async with taskserve.AsyncHTTPClient(secured.url, api_key=ALICE) as client:
        assert await client.add(a=2, b=2) == 4
    with pytest.raises(taskserve.AuthenticationError, match="not one this server accepts"):
        async with taskserve.AsyncHTTPClient(secured.url, api_key="wrong") as client:
            await client.add(a=2, b=2)


def test_the_cli_takes_api_key(secured: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    task_id = submit(secured, ALICE)
    result = CliRunner().invoke(cli, ["task", task_id, "--url", secured.url, "--api-key", ALICE, "--json"])
    assert result.exit_code == 0, result.output
    assert task_id in result.output
    denied = CliRunner().invoke(cli, ["queues", "--url", secured.url])
    assert denied.exit_code != 0 and "API key" in denied.output
    monkeypatch.setenv("TASKSERVE_API_KEY", BOB)
    assert CliRunner().invoke(cli, ["task", task_id, "--url", secured.url]).exit_code != 0  # bob's 404


def test_cors_admits_the_configured_origin_only(secured: Server) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    preflight["Access-Control-Request-Headers"] = "authorization, content-type"
    response = httpx.options(f"{secured.url}/echo/submit", headers=preflight)
    assert response.status_code == 200  # no key needed for a preflight
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    answer = httpx.get(f"{secured.url}/queues", headers={"Origin": ORIGIN, **key(ALICE)})
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(f"{secured.url}/queues", headers={"Origin": "https://evil.example", **key(ALICE)})
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize(
    ("asked", "refused"),
    [
        ({"Origin": "https://evil.example"}, "origin"),
        ({"Access-Control-Request-Method": "DELETE"}, "method"),
        ({"Access-Control-Request-Headers": "x-evil"}, "headers"),
    ],
)
def test_a_refused_preflight_is_json(secured: Server, asked: dict[str, str], refused: str) -> None:
    """Starlette answers a refused preflight in plain text; every error of this API is JSON that says what to fix."""
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", **asked}
    response = httpx.options(f"{secured.url}/echo/submit", headers=preflight)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert refused in error and "--cors-origin" in error


def test_a_blank_api_key_is_no_key_and_surrounding_whitespace_is_dropped(secured: Server) -> None:
    """A key read from a file ends in a newline; an empty one is none. Neither may look like a network fault."""
    with (
        taskserve.SyncHTTPClient(secured.url, api_key="") as client,
        pytest.raises(taskserve.AuthenticationError, match="api_key"),
    ):
        client.add(a=1, b=2)
    with taskserve.SyncHTTPClient(secured.url, api_key=f"  {ALICE}\n") as client:
        assert client.add(a=1, b=2) == 3


@taskserve.service(name="underui")
class UnderUi:
    @taskserve.task(route="/ui/echo")
    def echo(self, text: str) -> str:
        return text

    @taskserve.api(route="/ui")
    def shout(self, text: str) -> str:
        return text.upper()


@pytest.mark.anyio
async def test_an_endpoint_under_ui_needs_a_key_like_any_other(tmp_path: Path) -> None:
    """An endpoint at /ui turns the dashboard off: its path is the endpoint's then, and is not left open."""
    from taskserve.server import create_app
    from taskserve.service import load_service

    queue = Queue.from_url(f"sqlite:///{tmp_path}/tasks.db")
    await queue.connect()
    app = create_app(load_service(f"{__name__}:UnderUi"), queue, maintenance=False, api_keys=[f"alice={ALICE}"])
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            assert (await http.post("/ui/echo/submit", json={"text": "x"})).status_code == 401
            submitted = await http.post("/ui/echo/submit", json={"text": "x"}, headers=key(ALICE))
            task_id = submitted.json()["task_id"]
            assert (await http.get("/ui/echo/status", params={"task_id": task_id})).status_code == 401
            assert (await http.post("/ui", json={"text": "x"})).status_code == 401
            docs = (await http.get("/docs.json", headers=key(ALICE))).json()
            assert "401" in docs["paths"]["/ui/echo/submit"]["post"]["responses"]
            # The endpoint's operation, not the dashboard's page, which is not served.
            assert set(docs["paths"]["/ui"]) == {"post"} and "401" in docs["paths"]["/ui"]["post"]["responses"]
    finally:
        await queue.close()


def test_no_secret_reaches_the_log(secured: Server) -> None:
    log = secured.log.read_text()
    assert "alice" in log and "ops (admin)" in log  # the owners are named at start-up
    for secret in (ALICE, BOB, ADMIN, PLAIN):
        assert secret not in log


def test_a_keys_file_is_read_again_on_sighup(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nalice=first-secret\n\n")
    port = free_port()
    args = [sys.executable, "-m", "taskserve", "serve", SERVICE, "--port", str(port), "--workers", "0"]
    args += ["--broker", f"sqlite:///{tmp_path / 'tasks.db'}", "--api-keys-file", str(keys_file), "--public-metrics"]
    server = Server(args, port, tmp_path / "server.log", tagged_env(uuid.uuid4().hex))
    try:
        server.start()
        assert httpx.get(f"{server.url}/queues", headers=key("first-secret")).status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 200  # --public-metrics
        no_cors = httpx.get(f"{server.url}/healthz", headers={"Origin": ORIGIN})
        assert "access-control-allow-origin" not in no_cors.headers  # no --cors-origin, no CORS
        assert server.proc is not None
        keys_file.write_text("alice=second-secret\n")
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: httpx.get(f"{server.url}/queues", headers=key("second-secret")).status_code == 200)
        assert httpx.get(f"{server.url}/queues", headers=key("first-secret")).status_code == 401
        keys_file.unlink()  # a file that cannot be read keeps the keys in force
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "kept the old API keys" in server.log.read_text())
        assert httpx.get(f"{server.url}/queues", headers=key("second-secret")).status_code == 200
        assert "first-secret" not in server.log.read_text() and "second-secret" not in server.log.read_text()
    finally:
        server.stop()
        assert_none_left(server.tag)


def test_a_hangup_without_a_keys_file_does_not_stop_the_server(tmp_path: Path) -> None:
    """``systemctl reload`` sends SIGHUP, whose default action would end the server."""
    port = free_port()
    args = [sys.executable, "-m", "taskserve", "serve", SERVICE, "--port", str(port), "--workers", "0"]
    args += ["--broker", f"sqlite:///{tmp_path / 'tasks.db'}", "--api-key", "alice=s3cret"]
    server = Server(args, port, tmp_path / "server.log", tagged_env(uuid.uuid4().hex))
    try:
        server.start()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "nothing to reload" in server.log.read_text())
        assert server.proc.poll() is None
        assert httpx.get(f"{server.url}/queues", headers=key("s3cret")).status_code == 200
    finally:
        server.stop()
        assert_none_left(server.tag)


def test_keys_are_named_or_known_by_a_digest() -> None:
    assert parse_key("alice=s3cret") == ("alice", "s3cret")
    owner, secret = parse_key("YWJjZA==")  # base64 padding is no name
    assert secret == "YWJjZA==" and owner.startswith("key-") and "YWJj" not in owner
    keys = Keys(["alice=s3cret", "plain"], admin=["ops=r00t"])
    assert keys.lookup("s3cret") == keys.lookup(b"s3cret") and keys.lookup("s3cret").owner == "alice"  # type: ignore[union-attr]
    assert keys.lookup("r00t").admin  # type: ignore[union-attr]
    assert keys.lookup("s3cre") is None and keys.lookup("") is None
    assert not Keys().enabled
    # One secret under two names would make two teams one owner, each seeing the other's tasks.
    with pytest.raises(ValueError, match="alice and bob have the same secret"):
        Keys(["alice=shared", "bob=shared"])
    assert Keys(["alice=s3cret", "alice=s3cret"]).owners() == ["alice"]  # given twice (flag and env) is one key


def test_a_keys_file_saved_with_a_byte_order_mark_keeps_its_first_key(tmp_path: Path) -> None:
    """Windows editors start UTF-8 files with a BOM; it was read into the first line's name, breaking that key."""
    keys_file = tmp_path / "keys"
    keys_file.write_bytes("alice=first-secret\r\nbob=second-secret\r\n".encode("utf-8-sig"))
    keys = Keys(path=str(keys_file))
    first, second = keys.lookup("first-secret"), keys.lookup("second-secret")
    assert first is not None and first.owner == "alice"
    assert second is not None and second.owner == "bob"


@pytest.mark.anyio
async def test_the_store_lists_and_finds_tasks_per_owner(open_queue: OpenQueue) -> None:  # noqa: F811
    queue: Queue = open_queue()
    alice = [(await queue.enqueue(task(owner="alice"))).id for _ in range(3)]
    bob = (await queue.enqueue(task("/other", owner="bob"))).id
    page, cursor = await queue.list(owner="alice", limit=2)
    rest, end = await queue.list(owner="alice", limit=2, cursor=cursor)
    assert [r.id for r in page + rest] == alice[::-1] and end is None
    assert [r.id for r in (await queue.list(owner="bob", route="/other"))[0]] == [bob]
    assert (await queue.list(owner="bob", route="/gen"))[0] == []
    assert (await queue.get(bob, owner="bob")).owner == "bob"
    with pytest.raises(taskserve.TaskNotFound):
        await queue.get(bob, owner="alice")
    first = await queue.enqueue(task(owner="alice", idempotency_key="k"))
    again = await queue.enqueue(task(owner="alice", idempotency_key="k"))
    other = await queue.enqueue(task(owner="bob", idempotency_key="k"))
    assert again.replayed and again.id == first.id and not other.replayed and other.id != first.id
    assert again.idempotency_key == "k"
