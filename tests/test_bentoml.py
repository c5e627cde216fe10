"""A BentoML user's service file and BentoML's own clients, unchanged, against taskserve (SPEC §12).

Everything runs from the BentoML venv (``scripts/bentoml_env``; ``scripts/test`` builds it):
``taskserve serve tests.bento_service:Studio`` in one process, and BentoML 1.4.40's
``AsyncHTTPClient``/``SyncHTTPClient`` in others (tests/bento_clients.py), whose observations
are asserted here. taskserve's own client and plain HTTP drive the same server alongside.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import taskserve
from taskserve.queue import Queue
from taskserve.server import create_app
from taskserve.server.openapi import service_schema
from taskserve.service import load_service
from taskserve.worker import Worker

from .conftest import ROOT, SERVICE as TASKSERVE_SERVICE, Server, assert_none_left, free_port, tagged_env

VENV = Path(os.environ.get("TASKSERVE_BENTOML_VENV", ROOT / ".venv-bentoml"))
PYTHON = VENV / "bin" / "python"
SERVICE = "tests/bento_service.py:Studio"  # a file path, as BentoML's CLI takes it
CLIENTS = str(ROOT / "tests" / "bento_clients.py")


def _need_venv() -> None:
    if PYTHON.exists():
        return
    message = f"No BentoML venv at {VENV}; make it with ./scripts/bentoml_env."
    if os.environ.get("CI") == "true":
        pytest.fail(message + " CI=true needs it.")
    pytest.skip(message)


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The BentoML service file served by taskserve, from the BentoML venv, with the service's own workers (2)."""
    _need_venv()
    port = free_port()
    db = tmp_path_factory.mktemp("bentoml") / "tasks.db"
    args = [str(PYTHON), "-m", "taskserve", "serve", SERVICE, "--port", str(port), "--broker", f"sqlite:///{db}"]
    server = Server(args, port, db.parent / "server.log", tagged_env(uuid.uuid4().hex)).start()
    try:
        yield server
    finally:
        server.stop()
        assert_none_left(server.tag)


def run_clients(mode: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [str(PYTHON), CLIENTS, mode, *args], cwd=ROOT, env=tagged_env("bento-client"), capture_output=True, timeout=90
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def async_seen(studio: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What BentoML's AsyncHTTPClient saw going through the workflow once (one client run, ~3 s)."""
    return run_clients("async", studio.url, str(tmp_path_factory.mktemp("async-client")))


def test_async_client_runs_the_whole_task_workflow(async_seen: dict[str, Any]) -> None:
    seen = async_seen
    # Direct calls: a str result arrives as a string, a pydantic result as its fields; Context injected.
    assert seen["shout"] == "HI THERE!HI THERE!"
    assert seen["caption"] == {"text": "a red fox x2 at /describe", "words": 3}
    assert seen["area"] == 6.0  # input_spec= with **params
    assert seen["dtype_of"] == "float32"  # Annotated[np.ndarray, DType("float32")]
    # submit → get_status (BentoML's words) → get: images come back as PIL images.
    assert seen["statuses"][0] in ("pending", "in_progress", "completed")
    assert seen["statuses"][1] == "completed"
    assert seen["render"][:2] == ["PngImageFile", [5, 5]]
    # Multipart: an image upload with a text field (JSON-encoded by BentoML's client) beside it.
    assert seen["invert"] == [245, 235, 225]
    # Arrays both ways, a Path upload with its name, a pydantic input.
    assert seen["scale"] == ["ndarray", [[3.0, 4.0], [6.0, 8.0]]]
    assert seen["count_bytes"] == {"label": "doc", "bytes": 11, "name": "notes.txt"}
    assert seen["story"] == "once once once"
    assert seen["story_direct"] == "twice twice"
    # A Path returned from ctx.temp_dir outlives the call until it is sent (BentoML deletes it after).
    assert seen["reverse_file"] == "rahc nevele"


def test_async_client_streams_a_generator_as_it_yields(async_seen: dict[str, Any]) -> None:
    """``async for chunk in client.tokens(...)``: chunks arrive while the generator still runs."""
    assert async_seen["tokens"] == "w0 w1 w2 "
    assert async_seen["tokens_spread"] > 0.3  # yielded 0.4 s apart: not all at the end


def test_batchable_api_with_bentomls_default_latency_answers_at_once(async_seen: dict[str, Any]) -> None:
    # BentoML's max_latency_ms (60 s by default) bounds a request, it is not a wait for more items.
    assert async_seen["double"] == [2.0, 4.0]
    assert async_seen["double_seconds"] < 5


def test_bad_arguments_are_bentomls_400(async_seen: dict[str, Any]) -> None:
    assert async_seen["bad_input"][1] == 400


def test_root_input_takes_the_whole_body(studio: Server, async_seen: dict[str, Any]) -> None:
    """``def total(self, values: list[float], /)``: BentoML's curl examples send the list itself."""
    assert async_seen["total"] == 3.5
    assert httpx.post(f"{studio.url}/total", json=[1, 2.5]).json() == 3.5
    assert httpx.post(f"{studio.url}/total", json={"values": [4]}).json() == 4.0  # taskserve's own form
    refused = httpx.post(f"{studio.url}/total", json={"value": [4]})
    assert refused.status_code == 422 and "values" in refused.json()["error"]


def test_serve_names_a_bad_target_without_a_traceback() -> None:
    from click.testing import CliRunner

    from taskserve.cli import cli

    result = CliRunner().invoke(cli, ["serve", "tests/no_such_service.py:Svc", "--workers", "0"])
    assert result.exit_code == 1
    assert "Cannot import module 'no_such_service'" in result.output and "Traceback" not in result.output


def test_async_client_sees_failures_retries_and_cancels(async_seen: dict[str, Any]) -> None:
    seen = async_seen
    assert seen["explode_status"] == "failed"
    assert seen["explode_get"] == ["BentoMLException", 500]
    assert seen["retry_new_id"] is True and seen["retry_status"] == "failed"
    # A result not ready is BentoML's 400 (InvalidArgument); cancel really stops the task.
    assert seen["nap_get_early"] == ["InvalidArgument", 400]
    assert seen["nap_after_cancel"] == "canceled"


def test_batchable_task_batches_bentoml_submits(studio: Server, async_seen: dict[str, Any]) -> None:
    seen = async_seen
    assert seen["lengths"] == [[1], [2, 3], [4], [5, 6]]
    assert seen["lengths_direct"] == [2, 1]
    sizes = [httpx.get(f"{studio.url}/lengths/status", params={"task_id": i}).json() for i in seen["lengths_ids"]]
    assert all(s["status"] == "success" for s in sizes)
    assert max(s["batch_size"] for s in sizes) >= 3  # at least two tasks' items in one call


def test_sync_client(studio: Server, tmp_path: Path) -> None:
    seen = run_clients("sync", studio.url, str(tmp_path))
    assert seen == {
        "shout": "SYNC!",
        "invert_status": "completed",
        "invert": [55, 155, 255],
        "story_status": "completed",
        "story": "sync sync",
        "story_retry": "completed",
        "scale_direct": [0.5, 1.0, 1.5],
        "tokens": "s0 s1 ",
        "explode_status": "failed",
        "explode_get": 500,
    }


def test_taskserve_client_keeps_its_own_words(studio: Server) -> None:
    with taskserve.SyncHTTPClient(studio.url) as client:
        task = client.story.submit(prompt={"text": "ts", "steps": 2})
        assert task.wait(timeout=20) is taskserve.TaskStatus.SUCCESS
        assert task.get() == "ts ts"
        assert client.shout(text="ok") == "OK!"
        failed = client.explode.submit(reason="x")
        with pytest.raises(taskserve.TaskFailed, match="refused: x"):
            failed.get(timeout=20)
    # Plain HTTP: taskserve's status words and JSON strings; multipart str fields stay raw text.
    status = httpx.get(f"{studio.url}/explode/status", params={"task_id": failed.id}).json()
    assert status["status"] == "failure" and "executed_at" not in status
    assert httpx.post(f"{studio.url}/shout", files={"text": (None, "hey")}).json() == "HEY!"
    nap = httpx.post(f"{studio.url}/nap/submit", json={"seconds": 30}).json()["task_id"]
    assert httpx.get(f"{studio.url}/nap/get", params={"task_id": nap}).status_code == 409
    httpx.put(f"{studio.url}/nap/cancel", params={"task_id": nap}).raise_for_status()


def test_bentoml_wire_answers_by_user_agent(studio: Server) -> None:
    """``--bentoml-wire auto``: the same request gets BentoML's words only when BentoML's client sends it."""
    bento = {"User-Agent": "BentoML HTTP Client/1.4.40"}
    task_id = httpx.post(f"{studio.url}/story/submit", json={"prompt": {"text": "w"}}).json()["task_id"]
    ours = httpx.get(f"{studio.url}/story/wait", params={"task_id": task_id, "timeout": 20}, timeout=30).json()
    theirs = httpx.get(f"{studio.url}/story/status", params={"task_id": task_id}, headers=bento).json()
    assert (ours["status"], theirs["status"]) == ("success", "completed")
    assert theirs["executed_at"] == ours["started_at"]
    result = httpx.get(f"{studio.url}/story/get", params={"task_id": task_id}, headers=bento)
    assert result.headers["content-type"].startswith("text/plain") and result.text == "w w"
    schema = httpx.get(f"{studio.url}/schema.json").json()
    assert {r["name"] for r in schema["routes"]} == {e["name"] for e in schema["endpoints"]}
    invert = next(r for r in schema["routes"] if r["name"] == "invert")
    assert invert["input"]["properties"]["image"]["type"] == "file" and invert["output"]["pil"] is True


def test_service_options_map_or_are_warned_about(studio: Server) -> None:
    defined = run_clients("define")
    studio_def, gateway = defined["Studio"], defined["Gateway"]
    assert studio_def["workers"] == 2 and len(studio.worker_pids()) == 2
    assert {e["timeout"] for e in studio_def["endpoints"].values()} == {20.0}  # traffic.timeout
    assert studio_def["endpoints"]["caption"] == {
        "route": "/describe",
        "task": False,
        "timeout": 20.0,
        "batchable": False,
    }
    assert studio_def["inputs"]["nap"] == ["seconds"]  # the Context parameter is injected, not an input
    assert gateway["resources"] == {"gpu": 1} and gateway["endpoints"]["embed"]["timeout"] == 5.0
    warned = " ".join(gateway["warnings"])
    for option in ("max_concurrency", "memory", "bentoml.depends", "ASGI apps", "envs=", "shutdown hook", "batch_dim"):
        assert option in warned
    assert "resources 'cpu' is ignored" in studio.log.read_text()
    assert "ContentType(content_type='text/plain') is not checked" in studio.log.read_text()
    assert gateway["plan_without_gpus"] == [1, None]  # one worker, CUDA_VISIBLE_DEVICES left alone


# -- the wire of any taskserve service, in this process (no bentoml needed) ----------------

BENTO_UA = {"User-Agent": "BentoML HTTP Client/1.4.40"}


@contextlib.asynccontextmanager
async def in_process(tmp_path: Path, wire: str) -> AsyncIterator[httpx.AsyncClient]:
    """tests.services:TestService, a taskserve service, with one in-process worker and ``--bentoml-wire wire``."""
    service = load_service(TASKSERVE_SERVICE)
    queue, worker_queue = Queue.from_url(f"sqlite:///{tmp_path}/t.db"), Queue.from_url(f"sqlite:///{tmp_path}/t.db")
    await queue.connect()
    worker = Worker(service, worker_queue, concurrency=2, lease=2, name="in-process")
    running = asyncio.create_task(worker.run())
    app = create_app(service, queue, maintenance=False, bentoml_wire=wire)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client
    worker.stop()
    await asyncio.wait_for(running, 20)
    await worker_queue.close()
    await queue.close()


async def finished(api: httpx.AsyncClient, route: str, body: dict[str, Any]) -> str:
    task_id: str = (await api.post(f"/{route}/submit", json=body)).json()["task_id"]
    await api.get(f"/{route}/wait", params={"task_id": task_id, "timeout": 20})
    return task_id


@pytest.mark.anyio
async def test_wire_always_answers_everyone_in_bentomls_words(tmp_path: Path) -> None:
    async with in_process(tmp_path, "always") as api:
        echo = await finished(api, "echo", {"text": "plain"})
        status = (await api.get("/echo/status", params={"task_id": echo})).json()
        assert status["status"] == "completed" and status["executed_at"] == status["started_at"]
        result = await api.get("/echo/get", params={"task_id": echo})
        assert (result.headers["content-type"].split(";")[0], result.text) == ("text/plain", "plain")
        matrix = await finished(api, "transpose", {"matrix": [[1, 2], [3, 4]]})
        assert (await api.get("/transpose/get", params={"task_id": matrix})).json() == [[1, 3], [2, 4]]
        fail = await finished(api, "fail", {"message": "no"})
        assert (await api.get("/fail/status", params={"task_id": fail})).json()["status"] == "failed"
        assert (await api.get("/fail/get", params={"task_id": fail})).status_code == 500
        slow = (await api.post("/slow_async/submit", json={"seconds": 30})).json()["task_id"]
        assert (await api.get("/slow_async/get", params={"task_id": slow})).status_code == 400
        assert (await api.put("/slow_async/cancel", params={"task_id": slow})).json()["status"] == "canceled"
        # Multipart text fields are JSON, as BentoML's client writes them, str ones included.
        assert (await api.post("/echo", files={"text": (None, '"quoted"')})).text == "quoted"


@pytest.mark.anyio
async def test_wire_never_keeps_taskserves_words_for_bentomls_client(tmp_path: Path) -> None:
    async with in_process(tmp_path, "never") as api:
        echo = await finished(api, "echo", {"text": "plain"})
        status = (await api.get("/echo/status", params={"task_id": echo}, headers=BENTO_UA)).json()
        assert status["status"] == "success" and "executed_at" not in status
        assert (await api.get("/echo/get", params={"task_id": echo}, headers=BENTO_UA)).json() == "plain"


def test_schema_routes_describe_any_service_as_bentoml_reads_them() -> None:
    routes = {r["name"]: r for r in service_schema(load_service(TASKSERVE_SERVICE))["routes"]}
    assert routes["echo"]["output"] == {"type": "string"} and routes["echo"]["is_task"] is True
    assert routes["invert"]["input"]["properties"]["img"]["type"] == "file"
    assert routes["invert"]["output"] == {"type": "file", "format": "image", "pil": True}
    assert routes["transpose"]["input"]["properties"]["matrix"]["type"] == "tensor"
    midpoint = routes["midpoint"]["input"]["properties"]["a"]  # a pydantic model, inlined (no $ref)
    assert midpoint["type"] == "object" and set(midpoint["properties"]) == {"x", "y"}


def test_an_endpoint_on_a_server_path_is_refused_at_start() -> None:
    """A method named ``tasks`` (or ``metrics``, ``workers``, ...) would never be reached: say so."""
    from taskserve.exceptions import ServiceDefinitionError
    from taskserve.service import Endpoint

    def tasks(self: Any, text: str) -> str:
        return text

    with pytest.raises(ServiceDefinitionError, match="cannot have the route '/tasks'"):
        Endpoint(fn=tasks)
    assert Endpoint(fn=tasks, route="/my-tasks").route == "/my-tasks"
