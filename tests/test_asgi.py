"""The HTTP API in this test's own process: the ASGI app through ``httpx.ASGITransport``.

Beside the real-server tests (uvicorn and worker processes), these drive the same app and a
real worker on a real SQLite file in one process: fast, and every line they run is measured
by coverage.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

import taskserve
from taskserve.queue import Queue
from taskserve.server import create_app
from taskserve.service import load_service
from taskserve.worker import Worker

from .conftest import SERVICE

pytestmark = pytest.mark.anyio


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app and one in-process worker (concurrency 2) over one SQLite file."""
    service = load_service(SERVICE)
    queue = Queue.from_url(f"sqlite:///{tmp_path}/tasks.db")
    worker_queue = Queue.from_url(f"sqlite:///{tmp_path}/tasks.db")
    await queue.connect()
    worker = Worker(service, worker_queue, concurrency=2, lease=2, name="in-process")
    running = asyncio.create_task(worker.run())
    app = create_app(service, queue, maintenance=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client
    worker.stop()
    await asyncio.wait_for(running, 20)
    await worker_queue.close()
    await queue.close()


async def wait(api: httpx.AsyncClient, route: str, task_id: str) -> dict[str, object]:
    response = await api.get(f"/{route}/wait", params={"task_id": task_id, "timeout": 20})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_submit_wait_get(api: httpx.AsyncClient) -> None:
    task_id = (await api.post("/add/submit", json={"a": 2, "b": 3})).json()["task_id"]
    assert (await wait(api, "add", task_id))["status"] == "success"
    assert (await api.get("/add/get", params={"task_id": task_id})).json() == 5


async def test_failure_then_retry_then_cancel(api: httpx.AsyncClient) -> None:
    task_id = (await api.post("/fail/submit", json={"message": "no"})).json()["task_id"]
    status = await wait(api, "fail", task_id)
    assert status["status"] == "failure" and "ValueError: no" in str(status["error"])
    got = await api.get("/fail/get", params={"task_id": task_id})
    assert got.status_code == 409 and "ValueError: no" in got.json()["error"]
    again = (await api.post("/fail/retry", params={"task_id": task_id})).json()["task_id"]
    assert again != task_id
    slow = (await api.post("/slow_async/submit", json={"seconds": 30})).json()["task_id"]
    cancelled = await api.put("/slow_async/cancel", params={"task_id": slow})
    assert cancelled.json() == {"task_id": slow, "status": "cancelled"}
    assert (await api.put("/slow_async/cancel", params={"task_id": slow})).status_code == 409


async def test_the_dashboard_is_served_from_the_package_with_its_security_headers(api: httpx.AsyncClient) -> None:
    page = await api.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="ui/app.js"' in page.text and "<script>" not in page.text  # no inline script: the CSP forbids it
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    script = await api.get("/ui/app.js")
    assert script.headers["content-type"].startswith("text/javascript") and "innerHTML" not in script.text
    assert (await api.get("/ui/app.js", headers={"If-None-Match": script.headers["etag"]})).status_code == 304
    assert (await api.get("/ui/")).headers["location"] == "../ui"
    assert (await api.get("/ui/secrets.txt")).status_code == 404


async def test_readyz_and_workers_see_the_in_process_worker(api: httpx.AsyncClient) -> None:
    for _ in range(100):
        ready = await api.get("/readyz")
        if ready.status_code == 200:
            break
        await asyncio.sleep(0.05)
    assert ready.status_code == 200 and ready.json()["workers"]["/echo"] == 1
    [worker] = (await api.get("/workers")).json()["workers"]
    assert worker["id"] == "in-process" and worker["state"] == "ready" and worker["concurrency"] == 2


async def test_errors_are_json(api: httpx.AsyncClient) -> None:
    for method, path, code in [
        ("GET", "/add/status", 400),
        ("GET", "/add/status?task_id=nope", 404),
        ("GET", "/nowhere", 404),
        ("DELETE", "/add/submit", 405),
    ]:
        response = await api.request(method, path)
        assert response.status_code == code and response.json()["error"]
    invalid = await api.post("/add/submit", json={"a": "x"})
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"] == ["a"]


async def test_the_async_client_over_the_asgi_transport(api: httpx.AsyncClient) -> None:
    transport = api._transport
    async with taskserve.AsyncHTTPClient("http://test", transport=transport) as client:
        task = await client.echo.submit(text="in process")
        assert await task.get(timeout=20) == "in process"
        assert await client.describe(text="ab") == {"text": "ab", "length": 2}


async def test_the_app_mounted_under_a_prefix_and_query_strings_with_escapes(tmp_path: Path) -> None:
    """Routes are found by their literal path below the mount point; an escaped task id still reads."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    queue = Queue.from_url(f"sqlite:///{tmp_path}/tasks.db")
    await queue.connect()
    outer = Starlette(routes=[Mount("/ml", app=create_app(load_service(SERVICE), queue, maintenance=False))])
    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        task_id = (await client.post("/ml/add/submit", json={"a": 1, "b": 2})).json()["task_id"]
        status = await client.get("/ml/add/status", params={"task_id": task_id})
        assert status.status_code == 200 and status.json()["status"] == "pending"
        escaped = await client.get(f"/ml/add/status?task_id={task_id[:4]}%{ord(task_id[4]):02X}{task_id[5:]}")
        assert escaped.json()["task_id"] == task_id
        both = await client.get(f"/ml/add/status?task_id={task_id}&x=1")
        assert both.json()["task_id"] == task_id
        assert (await client.get("/ml/add/status", params={"task_id": "a+b"})).status_code == 404
        assert (await client.get("/add/status", params={"task_id": task_id})).status_code == 404
    await queue.close()


async def test_the_status_of_any_task_by_id_alone(api: httpx.AsyncClient) -> None:
    task_id = (await api.post("/add/submit", json={"a": 2, "b": 3})).json()["task_id"]
    await wait(api, "add", task_id)
    status = await api.get(f"/tasks/{task_id}")
    assert status.status_code == 200 and status.json()["route"] == "/add" and status.json()["status"] == "success"
    assert status.json() == (await api.get("/add/status", params={"task_id": task_id})).json()
    missing = await api.get("/tasks/nope")
    assert missing.status_code == 404 and missing.json()["error"]
    assert (await api.post(f"/tasks/{task_id}")).status_code == 405
