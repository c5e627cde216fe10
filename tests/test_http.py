"""The HTTP API (docs/api.md) against a real ``taskserve serve`` (uvicorn + worker processes), on each broker."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import taskserve

from .conftest import Server, validate_openapi


@pytest.fixture
def client(served: Server) -> taskserve.SyncHTTPClient:
    with taskserve.SyncHTTPClient(served.url) as c:
        yield c


def submit(served: Server, route: str, **args: object) -> str:
    r = httpx.post(f"{served.url}/{route}/submit", json=args)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "pending"
    return str(r.json()["task_id"])


def submitted(served: Server, endpoint: str) -> float:
    """The value of the API's submitted-tasks counter for ``endpoint`` (0 before the first submit)."""
    text = httpx.get(f"{served.url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "taskserve_tasks_submitted_total" and sample.labels.get("endpoint") == endpoint:
                return sample.value
    return 0.0


def finished(served: Server, route: str, task_id: str) -> dict[str, object]:
    r = httpx.get(f"{served.url}/{route}/wait", params={"task_id": task_id, "timeout": 20}, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_seed_workflow_returns_an_image(client: taskserve.SyncHTTPClient) -> None:
    task = client.image.submit(prompt="a scenic mountain view", size=96)
    assert isinstance(task.id, str)
    assert task.wait(timeout=20) is taskserve.TaskStatus.SUCCESS
    status = task.get_status()
    assert status.value == "success"
    image = task.get()
    assert isinstance(image, Image.Image)
    assert image.size == (96, 96)


def test_failure_keeps_the_error_and_retry_makes_a_new_task(client: taskserve.SyncHTTPClient) -> None:
    task = client.fail.submit(message="model exploded")
    assert task.wait(timeout=20).value == "failure"
    with pytest.raises(taskserve.TaskFailed, match="ValueError: model exploded"):
        task.get()
    assert task.status()["error"] == "ValueError: model exploded"
    new_task = task.retry()
    assert new_task.id != task.id
    assert new_task.wait(timeout=20).value == "failure"
    assert task.get_status().value == "failure"  # the old one is unchanged
    assert task.status()["attempts"] == 1


def test_an_exception_in_retry_on_runs_the_task_again(client: taskserve.SyncHTTPClient, tmp_path) -> None:
    log = tmp_path / "runs.log"
    task = client.flaky_connection.submit(log=str(log), failures=2)
    assert task.get(timeout=20) == 3
    assert task.status()["attempts"] == 3
    assert log.read_text().split() == ["run"] * 3
    exhausted = client.flaky_connection.submit(log=str(tmp_path / "other.log"), failures=5)
    assert exhausted.wait(timeout=20).value == "failure"
    assert exhausted.status()["attempts"] == 3  # max_attempts: no fourth run
    assert exhausted.status()["error"] == "ConnectionError: run 3 failed"


def test_status_json_has_the_contract_fields(served: Server) -> None:
    task_id = submit(served, "add", a=2, b=3)
    status = finished(served, "add", task_id)
    assert status["status"] == "success"
    assert {"task_id", "status", "created_at", "started_at", "completed_at", "attempts", "error"} <= status.keys()
    assert str(status["completed_at"]).endswith("Z")
    assert status["attempts"] == 1
    assert httpx.get(f"{served.url}/add/get", params={"task_id": task_id}).json() == 5


@pytest.mark.parametrize(
    ("method", "path", "params", "code"),
    [
        ("GET", "/add/status", {}, 400),
        ("GET", "/add/status", {"task_id": "nope"}, 404),
        ("GET", "/add/get", {"task_id": "nope"}, 404),
        ("POST", "/add/retry", {"task_id": "nope"}, 404),
        ("PUT", "/add/cancel", {"task_id": "nope"}, 404),
        ("GET", "/add/wait", {"task_id": "nope"}, 404),
        ("GET", "/no/such/route", {}, 404),
        ("DELETE", "/add/submit", {}, 405),
    ],
)
def test_errors_are_json_with_a_message(
    served: Server, method: str, path: str, params: dict[str, str], code: int
) -> None:
    r = httpx.request(method, served.url + path, params=params)
    assert r.status_code == code
    assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_an_id_of_another_route_is_not_found(served: Server) -> None:
    task_id = submit(served, "echo", text="hi")
    assert httpx.get(f"{served.url}/add/status", params={"task_id": task_id}).status_code == 404
    assert httpx.get(f"{served.url}/echo/status", params={"task_id": task_id}).status_code == 200


def test_get_before_the_end_is_409_and_retry_of_running_task_too(served: Server) -> None:
    task_id = submit(served, "slow_async", seconds=3)
    r = httpx.get(f"{served.url}/slow_async/get", params={"task_id": task_id})
    assert r.status_code == 409
    assert r.json()["status"] in ("pending", "in_progress")
    assert httpx.post(f"{served.url}/slow_async/retry", params={"task_id": task_id}).status_code == 409
    httpx.put(f"{served.url}/slow_async/cancel", params={"task_id": task_id})


def test_cancel_of_a_finished_task_is_409(served: Server) -> None:
    task_id = submit(served, "echo", text="done")
    assert finished(served, "echo", task_id)["status"] == "success"
    r = httpx.put(f"{served.url}/echo/cancel", params={"task_id": task_id})
    assert r.status_code == 409
    assert r.json()["status"] == "success"


def test_get_of_a_failed_task_is_409_with_the_failure(served: Server) -> None:
    task_id = submit(served, "fail", message="bad prompt")
    finished(served, "fail", task_id)
    r = httpx.get(f"{served.url}/fail/get", params={"task_id": task_id})
    assert r.status_code == 409
    assert "ValueError: bad prompt" in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [({"a": "three"}, "a"), ({"b": 2}, "a"), ({"a": 1, "c": 2}, "c")],
)
def test_invalid_input_is_422_naming_the_field_and_queues_nothing(served: Server, body: dict, field: str) -> None:
    before = submitted(served, "add")
    r = httpx.post(f"{served.url}/add/submit", json=body)
    assert r.status_code == 422
    assert field in r.json()["error"]
    assert any(d["loc"] == [field] for d in r.json()["detail"])
    assert submitted(served, "add") == before
    submit(served, "add", a=1)  # the counter does move when something is queued
    assert submitted(served, "add") == before + 1


def test_malformed_json_is_422(served: Server) -> None:
    r = httpx.post(f"{served.url}/add/submit", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "JSON" in r.json()["error"]


def test_body_over_the_limit_is_413(served: Server) -> None:
    r = httpx.post(f"{served.url}/echo/submit", json={"text": "x" * 3_100_000})
    assert r.status_code == 413
    assert "limit" in r.json()["error"]


def test_submit_many_is_in_order(served: Server) -> None:
    r = httpx.post(f"{served.url}/add/submit_many", json=[{"a": i} for i in range(20)])
    tasks = r.json()["tasks"]
    assert [t["status"] for t in tasks] == ["pending"] * 20
    results = []
    for t in tasks:
        finished(served, "add", t["task_id"])
        results.append(httpx.get(f"{served.url}/add/get", params={"task_id": t["task_id"]}).json())
    assert results == [i + 1 for i in range(20)]


def test_submit_many_with_a_bad_item_submits_none(served: Server, tmp_path) -> None:
    log = tmp_path / "ran.log"
    items = [{"x": 1, "log": str(log)}, {"x": "two", "log": str(log)}, {"log": str(log)}]
    r = httpx.post(f"{served.url}/record/submit_many", json=items)
    assert r.status_code == 422
    assert {(d["index"], d["loc"][0]) for d in r.json()["detail"]} == {(1, "x"), (2, "x")}
    assert "item 1" in r.json()["error"]
    ok = httpx.post(f"{served.url}/record/submit_many", json=[{"x": 7, "log": str(log)}]).json()["tasks"][0]
    finished(served, "record", ok["task_id"])
    assert log.read_text().split() == ["7"]  # only the later, valid batch ever ran


def test_wait_long_polls_until_done(served: Server) -> None:
    task_id = submit(served, "slow_async", seconds=0.5)
    r = httpx.get(f"{served.url}/slow_async/wait", params={"task_id": task_id, "timeout": 20}, timeout=30)
    assert r.json()["status"] == "success"
    assert r.elapsed.total_seconds() < 10


def test_wait_returns_the_unfinished_status_after_its_timeout(served: Server) -> None:
    task_id = submit(served, "slow_async", seconds=5)
    r = httpx.get(f"{served.url}/slow_async/wait", params={"task_id": task_id, "timeout": 0.3}, timeout=30)
    assert r.json()["status"] in ("pending", "in_progress")
    assert r.elapsed.total_seconds() < 3
    assert httpx.get(f"{served.url}/slow_async/wait", params={"task_id": task_id, "timeout": "x"}).status_code == 400
    httpx.put(f"{served.url}/slow_async/cancel", params={"task_id": task_id})


def test_direct_call_of_a_task_and_of_an_api(served: Server, client: taskserve.SyncHTTPClient) -> None:
    assert httpx.post(f"{served.url}/add", json={"a": 40, "b": 2}).json() == 42
    assert client.describe(text="hello") == {"text": "hello", "length": 5}
    assert client.add(a=1) == 2
    r = httpx.post(f"{served.url}/fail", json={"message": "nope"})
    assert r.status_code == 500
    assert "ValueError: nope" in r.json()["error"]
    assert httpx.post(f"{served.url}/describe/submit", json={"text": "x"}).status_code == 404


def test_task_timeout_ends_as_failure(client: taskserve.SyncHTTPClient) -> None:
    task = client.too_slow.submit()
    assert task.wait(timeout=20).value == "failure"
    assert "TimeoutError" in task.status()["error"]


def test_image_upload_round_trip(served: Server, client: taskserve.SyncHTTPClient) -> None:
    original = Image.new("RGB", (8, 4), (10, 20, 30))
    inverted = client.invert.submit(img=original).get(timeout=20)
    assert inverted.size == (8, 4)
    assert inverted.getpixel((0, 0)) == (245, 235, 225)
    buf = io.BytesIO()
    original.save(buf, format="PNG")
    r = httpx.post(f"{served.url}/invert", files={"img": ("in.png", buf.getvalue(), "image/png")})
    assert r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).getpixel((3, 3)) == (245, 235, 225)


def test_a_non_image_upload_is_422(served: Server) -> None:
    r = httpx.post(f"{served.url}/invert/submit", files={"img": ("x.png", b"not an image", "image/png")})
    assert r.status_code == 422
    assert "img" in r.json()["error"]


def test_file_bytes_array_and_model_arguments(served: Server, client: taskserve.SyncHTTPClient, tmp_path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello file")
    assert client.file_info.submit(upload=path).get(timeout=20) == {"name": "notes.txt", "size": 10, "head": "hello"}
    assert client.reverse_bytes.submit(data=b"abc").get(timeout=20) == b"cba"
    b64 = base64.b64encode(b"xyz").decode()
    assert httpx.post(f"{served.url}/reverse_bytes", json={"data": b64}).content == b"zyx"
    result = client.transpose.submit(matrix=np.arange(6).reshape(2, 3)).get(timeout=20)
    assert isinstance(result, np.ndarray)
    assert result.tolist() == [[0, 3], [1, 4], [2, 5]]
    assert client.midpoint(a={"x": 0, "y": 0}, b={"x": 2, "y": 4}) == {"x": 1.0, "y": 2.0}


def test_schema_lists_endpoints_and_openapi_is_valid(served: Server) -> None:
    schema = httpx.get(f"{served.url}/schema.json").json()
    by_name = {e["name"]: e for e in schema["endpoints"]}
    assert by_name["image"]["task"] is True and by_name["describe"]["task"] is False
    assert by_name["image"]["output"]["kind"] == "image"
    assert by_name["add"]["input"]["required"] == ["a"]
    docs = httpx.get(f"{served.url}/docs.json").json()
    validate_openapi(docs)
    assert docs["openapi"].startswith("3.1")
    assert "/image/submit" in docs["paths"] and "/describe" in docs["paths"]


def test_health_ready_and_metrics(served: Server) -> None:
    assert httpx.get(f"{served.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{served.url}/readyz").json()
    assert ready["status"] == "ready" and len(ready["worker_pids"]) == 2
    submit(served, "echo", text="count me")
    text = httpx.get(f"{served.url}/metrics").text
    assert 'taskserve_tasks_submitted_total{endpoint="echo"}' in text
    assert "taskserve_queue_tasks" in text
    assert "taskserve_queue_up 1.0" in text


def test_client_errors_name_the_field_before_anything_runs(client: taskserve.SyncHTTPClient) -> None:
    with pytest.raises(taskserve.ValidationFailed, match="prompt") as info:
        client.image.submit(promt="typo")
    assert any(d["loc"] == ["prompt"] for d in info.value.detail)
    with pytest.raises(AttributeError, match="no endpoint 'nothing'"):
        client.nothing.submit()
    with pytest.raises(taskserve.TaskNotFound):
        client.echo.task("missing").get_status()


@pytest.mark.anyio
async def test_async_client(served: Server) -> None:
    async with taskserve.AsyncHTTPClient(served.url) as client:
        task = await client.add.submit(a=5, b=6)
        assert await task.wait(timeout=20) is taskserve.TaskStatus.SUCCESS
        assert await task.get_status() is taskserve.TaskStatus.SUCCESS
        assert await task.get() == 11
        tasks = await client.echo.submit_many([{"text": "a"}, {"text": "b"}])
        assert [await t.get(timeout=20) for t in tasks] == ["a", "b"]
        assert await client.describe(text="abc") == {"text": "abc", "length": 3}
        failing = await client.fail.submit(message="x")
        await failing.wait(timeout=20)
        with pytest.raises(taskserve.TaskFailed):
            await failing.get()
        with pytest.raises(taskserve.TaskNotReady):
            await (await client.slow_async.submit(seconds=5)).get()
