"""Clients at scale (docs/clients.md): map() on both clients, the bulk wait endpoint, one client shared widely.

Against a real ``taskserve serve`` with worker processes, on each broker. Request counts are
counted on the wire by a transport wrapper; speed belongs to ``bench/clients.py``.
"""

from __future__ import annotations

import asyncio
import pathlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

import taskserve

from .conftest import Server, validate_openapi


class CountingTransport(httpx.HTTPTransport):
    """Counts the requests a client sends, by path, thread-safely."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.paths.append(request.url.path)
        return super().handle_request(request)


class AsyncCountingTransport(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return await super().handle_async_request(request)


@pytest.fixture
def client(served: Server) -> Iterator[taskserve.SyncHTTPClient]:
    with taskserve.SyncHTTPClient(served.url) as c:
        yield c


def wait_many(served: Server, route: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{served.url}/{route}/wait_many", json=body, timeout=60, **kwargs)


def submit(served: Server, route: str, **args: Any) -> str:
    r = httpx.post(f"{served.url}/{route}/submit", json=args)
    assert r.status_code == 200, r.text
    return str(r.json()["task_id"])


# -- map() ---------------------------------------------------------------------------------


def test_map_yields_results_in_input_order(client: taskserve.SyncHTTPClient) -> None:
    results = list(client.add.map([{"a": i, "b": 1000} for i in range(250)]))
    assert results == [i + 1000 for i in range(250)]


def test_map_takes_bare_values_for_a_one_parameter_endpoint(client: taskserve.SyncHTTPClient) -> None:
    assert list(client.echo.map(["a", "b", "c"])) == ["a", "b", "c"]
    # A dict is always arguments, never the value of the one parameter.
    assert list(client.echo.map([{"text": "d"}])) == ["d"]


def test_map_refuses_bare_values_where_parameters_are_several(client: taskserve.SyncHTTPClient) -> None:
    with pytest.raises(TypeError, match="one parameter"):
        client.add.map([1, 2])


def test_map_as_completed_yields_every_result_once(client: taskserve.SyncHTTPClient) -> None:
    items = [{"seconds": 0.6}, *({"seconds": 0.0} for _ in range(5))]
    results = list(client.slow_sync.map(items, as_completed=True))
    assert len(results) == 6 and all(isinstance(r, dict) and "pid" in r for r in results)
    items2 = [{"a": i} for i in range(40)]
    assert sorted(client.add.map(items2, as_completed=True)) == [i + 1 for i in range(40)]


def test_map_reports_a_failure_in_its_place_and_keeps_the_others(
    client: taskserve.SyncHTTPClient, tmp_path: pathlib.Path
) -> None:
    # A marker that is a directory makes slow_sync raise (IsADirectoryError) for that item only.
    items = [{"seconds": 0, "marker": str(tmp_path) if i % 3 == 1 else None} for i in range(9)]
    results = list(client.slow_sync.map(items))
    for i, result in enumerate(results):
        if i % 3 == 1:
            assert isinstance(result, taskserve.TaskFailed), result
            assert "IsADirectoryError" in str(result)
            assert result.task.get_status() is taskserve.TaskStatus.FAILURE
        else:
            assert isinstance(result, dict) and "pid" in result


def test_map_fetches_results_that_are_not_json(client: taskserve.SyncHTTPClient) -> None:
    images = list(client.image.map([{"prompt": "p", "size": s} for s in (16, 24, 32)]))
    assert [im.size for im in images] == [(16, 16), (24, 24), (32, 32)]
    assert all(isinstance(im, Image.Image) for im in images)
    arrays = list(client.scale.map([{"values": np.arange(3, dtype=np.float32) + k} for k in range(3)]))
    for k, arr in enumerate(arrays):
        assert arr.dtype == np.float32 and arr.tolist() == [2.0 * (x + k) for x in range(3)]


def test_map_costs_few_requests(served: Server) -> None:
    transport = CountingTransport()
    n = 1500
    with taskserve.SyncHTTPClient(served.url, transport=transport) as client:
        assert list(client.add.map([{"a": i} for i in range(n)])) == [i + 1 for i in range(n)]
    submits = transport.paths.count("/add/submit_many")
    waits = transport.paths.count("/add/wait_many")
    assert submits == 2  # chunks of 1,000
    # At least 100 tasks per answer while they run, plus one answer per 2 s of waiting at worst.
    assert len(transport.paths) <= 40, transport.paths
    assert waits >= 1 and not any(p.endswith(("/get", "/wait", "/status")) for p in transport.paths)


def test_map_on_an_empty_list_sends_nothing(served: Server) -> None:
    transport = CountingTransport()
    with taskserve.SyncHTTPClient(served.url, transport=transport) as client:
        assert list(client.add.map([])) == []
    assert transport.paths == ["/schema.json"]


def test_map_draws_a_progress_bar(client: taskserve.SyncHTTPClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert list(client.add.map([{"a": i} for i in range(20)], progress=True)) == [i + 1 for i in range(20)]
    assert "add" in capsys.readouterr().out


@pytest.mark.anyio
async def test_async_map_in_order_as_completed_and_with_failures(served: Server, tmp_path: pathlib.Path) -> None:
    transport = AsyncCountingTransport()
    async with taskserve.AsyncHTTPClient(served.url, transport=transport) as client:
        assert [r async for r in client.add.map([{"a": i} for i in range(300)])] == [i + 1 for i in range(300)]
        done = [r async for r in client.echo.map(["x", "y", "z"], as_completed=True)]
        assert sorted(done) == ["x", "y", "z"]
        items = [{"seconds": 0, "marker": str(tmp_path) if i == 2 else None} for i in range(4)]
        results = [r async for r in client.slow_sync.map(items)]
        assert isinstance(results[2], taskserve.TaskFailed) and "IsADirectoryError" in str(results[2])
        assert all(isinstance(r, dict) for i, r in enumerate(results) if i != 2)
        images = [r async for r in client.image.map([{"prompt": "q", "size": 20}] * 2)]
        assert [im.size for im in images] == [(20, 20), (20, 20)]
    assert transport.paths.count("/add/submit_many") == 1
    assert len(transport.paths) < 40


# -- the bulk wait endpoint ----------------------------------------------------------------


def test_wait_many_answers_ended_tasks_with_inline_results(served: Server) -> None:
    ids = [submit(served, "add", a=i, b=1) for i in range(5)]
    r = wait_many(served, "add", {"task_ids": ids, "timeout": 20, "min_done": 5})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert [t["task_id"] for t in body["tasks"]] == ids  # request order
    assert [t["result"] for t in body["tasks"]] == [i + 1 for i in range(5)]
    assert all(t["status"] == "success" and t["completed_at"] and t["error"] is None for t in body["tasks"])
    assert body["pending"] == [] and body["missing"] == []
    full = wait_many(served, "add", {"task_ids": ids[:1], "full_status": True}).json()["tasks"][0]
    status = httpx.get(f"{served.url}/add/status", params={"task_id": ids[0]}).json()
    assert {k: v for k, v in full.items() if k != "result"} == status and full["result"] == 1


def test_wait_many_gives_failures_their_error_and_files_a_url(served: Server) -> None:
    failed = submit(served, "fail", message="boom")
    image = submit(served, "image", prompt="x", size=8)
    body = wait_many(served, "fail", {"task_ids": [failed], "timeout": 20}).json()
    assert body["tasks"][0]["status"] == "failure" and "boom" in body["tasks"][0]["error"]
    assert "result" not in body["tasks"][0]
    entry = wait_many(served, "image", {"task_ids": [image], "timeout": 20}).json()["tasks"][0]
    assert "result" not in entry and entry["result_url"] == f"/image/get?task_id={image}"
    got = httpx.get(served.url + entry["result_url"])
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"


def test_wait_many_without_results_sends_statuses_only(served: Server) -> None:
    task_id = submit(served, "echo", text="hi")
    entry = wait_many(served, "echo", {"task_ids": [task_id], "results": False}).json()["tasks"][0]
    assert entry["status"] == "success" and "result" not in entry and entry["result_url"]


def test_wait_many_times_out_with_the_open_tasks_pending(served: Server) -> None:
    slow = submit(served, "slow_async", seconds=30)
    try:
        body = wait_many(served, "slow_async", {"task_ids": [slow], "timeout": 0.3}).json()
        assert body == {"tasks": [], "pending": [slow], "missing": []}
        body = wait_many(served, "slow_async", {"task_ids": [slow], "timeout": 0}).json()
        assert body["pending"] == [slow]
    finally:
        httpx.put(f"{served.url}/slow_async/cancel", params={"task_id": slow})
    body = wait_many(served, "slow_async", {"task_ids": [slow], "timeout": 20}).json()
    assert body["tasks"][0]["status"] == "cancelled"


def test_wait_many_answers_once_one_ends_by_default(served: Server) -> None:
    slow = submit(served, "slow_async", seconds=30)
    fast = submit(served, "slow_async", seconds=0)
    try:
        body = wait_many(served, "slow_async", {"task_ids": [slow, fast], "timeout": 25}).json()
        assert [t["task_id"] for t in body["tasks"]] == [fast]
        assert body["pending"] == [slow]
    finally:
        httpx.put(f"{served.url}/slow_async/cancel", params={"task_id": slow})


def test_wait_many_lists_unknown_ids_and_ids_of_another_route_as_missing(served: Server) -> None:
    other = submit(served, "echo", text="elsewhere")
    mine = submit(served, "add", a=1)
    body = wait_many(served, "add", {"task_ids": [mine, "no-such-task", other, mine], "timeout": 20}).json()
    assert sorted(body["missing"]) == sorted(["no-such-task", other])
    # An unknown id answers at once; the known one is reported as it is then, once (duplicates merge).
    assert [t["task_id"] for t in body["tasks"]] + body["pending"] == [mine]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"task_ids": "abc"}, "task_ids"),
        ({"task_ids": [1, 2]}, "task_ids"),
        ({}, "task_ids"),
        ({"task_ids": ["a"] * 1001}, "task_ids"),
        ({"task_ids": ["a"], "timeout": -1}, "timeout"),
        ({"task_ids": ["a"], "timeout": "soon"}, "timeout"),
        ({"task_ids": ["a"], "min_done": 0}, "min_done"),
        ({"task_ids": ["a"], "results": "yes"}, "results"),
        ({"task_ids": ["a"], "full_status": 1}, "full_status"),
        ({"task_ids": ["a"], "extra": 1}, "extra"),
        ([], None),
    ],
)
def test_wait_many_refuses_invalid_bodies_with_422(served: Server, body: Any, field: str | None) -> None:
    r = wait_many(served, "add", body)
    assert r.status_code == 422, r.text
    assert isinstance(r.json()["error"], str)
    if field is not None:
        assert r.json()["detail"][0]["loc"] == [field]


def test_wait_many_refuses_bad_json_and_huge_bodies(served: Server) -> None:
    r = httpx.post(f"{served.url}/add/wait_many", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]
    r = httpx.post(f"{served.url}/add/wait_many", content=b" " * (2 * 1024 * 1024))
    assert r.status_code == 413 and r.json()["error"]
    r = httpx.get(f"{served.url}/add/wait_many")
    assert r.status_code == 405


def test_wait_many_is_in_the_openapi_document_and_the_schema(served: Server) -> None:
    docs = httpx.get(f"{served.url}/docs.json").json()
    validate_openapi(docs)
    op = docs["paths"]["/add/wait_many"]["post"]
    assert set(op["responses"]) >= {"200", "413", "422"}
    assert "task_ids" in op["requestBody"]["content"]["application/json"]["schema"]["properties"]
    schema = httpx.get(f"{served.url}/schema.json").json()
    add = next(e for e in schema["endpoints"] if e["name"] == "add")
    assert add["bulk"]["wait_many"] == "/add/wait_many"
    describe = next(e for e in schema["endpoints"] if e["name"] == "describe")
    assert "bulk" not in describe  # an @api endpoint has no tasks to wait for


# -- one client, many callers --------------------------------------------------------------


@pytest.mark.anyio
async def test_one_async_client_shared_by_256_coroutines(served: Server) -> None:
    async with taskserve.AsyncHTTPClient(served.url) as client:

        async def one(i: int) -> int:
            task = await client.add.submit(a=i, b=7)
            assert await task.wait(timeout=60) is taskserve.TaskStatus.SUCCESS
            return int(await task.get())

        assert await asyncio.gather(*(one(i) for i in range(256))) == [i + 7 for i in range(256)]


@pytest.mark.anyio
async def test_the_httpx_pools_transport_serves_256_coroutines(served: Server) -> None:
    """The default where aiohttp is not installed."""
    transport = taskserve.client.AsyncPoolsTransport(pools=4, per_pool=8)
    async with taskserve.AsyncHTTPClient(served.url, transport=transport) as client:

        async def one(i: int) -> int:
            return int(await (await client.add.submit(a=i, b=2)).get(timeout=60))

        assert await asyncio.gather(*(one(i) for i in range(256))) == [i + 2 for i in range(256)]


@pytest.mark.anyio
async def test_the_async_client_sends_files_and_reads_binary_results(served: Server) -> None:
    """Multipart bodies and non-JSON answers through the default (aiohttp) transport."""
    async with taskserve.AsyncHTTPClient(served.url) as client:
        image = Image.new("RGB", (6, 4), (10, 20, 30))
        inverted = await (await client.invert.submit(img=image)).get(timeout=30)
        assert inverted.size == (6, 4) and inverted.getpixel((0, 0)) == (245, 235, 225)
        assert await (await client.reverse_bytes.submit(data=b"abc")).get(timeout=30) == b"cba"
        with pytest.raises(taskserve.ValidationFailed):
            await client.add.submit(a="not a number")


@pytest.mark.anyio
async def test_the_async_client_reports_an_unreachable_server(served: Server) -> None:
    from .conftest import free_port

    client = taskserve.AsyncHTTPClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(taskserve.ClientError, match="Cannot reach"):
        await client.endpoints()
    await client.aclose()


def test_one_sync_client_shared_by_64_threads(served: Server) -> None:
    with taskserve.SyncHTTPClient(served.url) as client:

        def one(i: int) -> int:
            task = client.add.submit(a=i, b=3)
            return int(task.get(timeout=60))

        with ThreadPoolExecutor(64) as pool:
            assert list(pool.map(one, range(256))) == [i + 3 for i in range(256)]


def test_a_cancel_or_retry_refused_by_the_tasks_state_is_an_invalid_transition(
    client: taskserve.SyncHTTPClient,
) -> None:
    """A second cancel of a cancelled task (as after a lost reply) is refused as such, not as its outcome."""
    task = client.slow_async.submit(seconds=30)
    with pytest.raises(taskserve.InvalidTransition, match="still"):
        task.retry()
    assert task.cancel() is taskserve.TaskStatus.CANCELLED
    with pytest.raises(taskserve.InvalidTransition, match="already ended") as refused:
        task.cancel()
    assert refused.value.status == "cancelled"
    with pytest.raises(taskserve.TaskCancelled):
        task.get()


@pytest.mark.anyio
async def test_the_async_client_refuses_a_second_cancel_as_an_invalid_transition(served: Server) -> None:
    async with taskserve.AsyncHTTPClient(served.url) as client:
        task = await client.slow_async.submit(seconds=30)
        assert await task.cancel() is taskserve.TaskStatus.CANCELLED
        with pytest.raises(taskserve.InvalidTransition, match="already ended"):
            await task.cancel()
        with pytest.raises(taskserve.TaskCancelled):
            await task.get()
