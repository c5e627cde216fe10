"""Large uploads: they arrive byte-identical in the worker, are checked like small ones, and the
API process does not hold many copies of them (taskserve/_splice.py)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlparse

import httpx
import pytest
from PIL import Image

import taskserve
from taskserve import _splice
from taskserve.queue import Queue
from taskserve.server import create_app
from taskserve.service import load_service

from .conftest import BROKERS, SERVICE, Server, fresh_broker, module_server, wait_until


@pytest.fixture(scope="module", params=BROKERS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with (
        fresh_broker(request.param, tmp_path_factory) as url,
        module_server(tmp_path_factory, url, "--workers", "1", "--max-body-size", "60000000") as started,
    ):
        yield started


def _result(server: Server, response: httpx.Response) -> httpx.Response:
    assert response.status_code == 200, response.text
    task_id = response.json()["task_id"]

    def done() -> dict[str, object] | None:
        status: dict[str, object] = httpx.get(f"{server.url}/tasks/{task_id}").json()
        return status if status["status"] in ("success", "failure") else None

    status = wait_until(done, 60)
    assert status["status"] == "success", status
    route = response.url.path.split("/")[1]
    return httpx.get(f"{server.url}/{route}/get", params={"task_id": task_id})


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the API's peak memory from /proc")
def test_a_large_file_arrives_intact_and_never_whole_in_the_api(server: Server) -> None:
    assert server.proc is not None

    def upload(data: bytes) -> httpx.Response:
        files = {"upload": ("big.bin", data, "application/octet-stream")}
        return httpx.post(f"{server.url}/checksum/submit", files=files, timeout=60)

    _result(server, upload(os.urandom(5_000_000)))  # the first large upload sizes caches and buffers once
    data = os.urandom(40_000_000)
    before = _peak_rss(server.proc.pid)
    response = upload(data)
    growth = _peak_rss(server.proc.pid) - before
    assert _result(server, response).json() == {"sha256": hashlib.sha256(data).hexdigest(), "name": "big.bin"}
    # Parsed to a file, encoded to a file, stored in chunks: a few MB, never the upload (its
    # base64 alone would be 1.33x; before uploads were stored in chunks it was over 4x).
    assert growth < len(data) / 2, f"the API grew by {growth / len(data):.2f}x the upload"
    broker = server.args[server.args.index("--broker") + 1]
    if broker.startswith("redis"):
        assert not _staged(broker), "the chunks sent ahead were not moved into the task"


def _staged(broker: str) -> list[bytes]:
    """The keys of large arguments sent to Redis ahead of their submit."""
    import redis

    prefix = dict(parse_qsl(urlparse(broker).query))["prefix"]
    client = redis.Redis.from_url(broker.partition("?")[0])
    try:
        return list(client.scan_iter(f"{prefix}:up:*"))
    finally:
        client.close()


def test_large_base64_in_json_arrives_intact(server: Server) -> None:
    data = os.urandom(3_000_000)
    body = {"data": base64.b64encode(data).decode()}
    result = _result(server, httpx.post(f"{server.url}/checksum/submit", json=body, timeout=60))
    assert result.json() == {"sha256": hashlib.sha256(data).hexdigest(), "name": None}


def test_large_base64_that_is_not_base64_is_refused(server: Server) -> None:
    text = base64.b64encode(os.urandom(4_500_000)).decode()
    # A stray character, and padding at the end of the first 4 MiB checked (valid there alone).
    for bad in (text[:2_000_000] + "!" + text[2_000_001:], text[:4_194_302] + "==" + text[4_194_304:]):
        response = httpx.post(f"{server.url}/checksum/submit", json={"data": bad}, timeout=60)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["data"]


def _noise_png(size: int) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(out, format="PNG")
    return out.getvalue()


def test_large_images_are_still_checked(server: Server) -> None:
    image = _noise_png(800)
    assert len(image) > 1_100_000  # over the size at which values are spliced
    ok = httpx.post(f"{server.url}/invert/submit", files={"img": ("a.png", image, "image/png")}, timeout=60)
    assert _result(server, ok).headers["content-type"] == "image/png"
    broken = image[:600_000] + bytes(len(image) - 600_000)
    for files, body in (
        ({"img": ("a.png", broken, "image/png")}, None),
        (None, {"img": base64.b64encode(broken).decode()}),
    ):
        response = httpx.post(f"{server.url}/invert/submit", files=files, json=body, timeout=60)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["img"]


# -- temporary files: closed however a request ends ------------------------------------------------


@pytest.fixture
def spooled(monkeypatch: pytest.MonkeyPatch) -> list[_splice.SpooledArgs]:
    """Every SpooledArgs the API makes from now on, to check that each was closed."""
    made: list[_splice.SpooledArgs] = []

    class Recorded(_splice.SpooledArgs):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(_splice, "SpooledArgs", Recorded)
    return made


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Queue]]:
    """The app in process over a fresh SQLite queue, with no workers."""
    queue = Queue.from_url(f"sqlite:///{tmp_path / 'tasks.db'}")
    await queue.connect()
    asgi = create_app(load_service(SERVICE), queue, maintenance=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://test") as http:
        yield http, queue
    await queue.close()


LARGE = base64.b64encode(os.urandom(1_500_000)).decode()  # spliced: over a MiB of base64


@pytest.mark.anyio
async def test_a_refused_submit_many_closes_the_large_arguments_it_validated(
    api: tuple[httpx.AsyncClient, Queue], spooled: list[_splice.SpooledArgs]
) -> None:
    http, queue = api
    answer = await http.post("/checksum/submit_many", json=[{"data": LARGE}, {"data": 5}])
    assert answer.status_code == 422, answer.text
    assert len(spooled) == 1 and all(args.file.closed for args in spooled)
    assert await queue.counts() == {}


@pytest.mark.anyio
async def test_a_refused_retry_closes_the_large_arguments_it_validated(
    api: tuple[httpx.AsyncClient, Queue], spooled: list[_splice.SpooledArgs]
) -> None:
    http, queue = api
    task_id = (await http.post("/checksum/submit", json={"data": LARGE})).json()["task_id"]
    assert len(await queue.claim(["/checksum"], "w")) == 1  # running: not yet a task to retry
    answer = await http.post("/checksum/retry", params={"task_id": task_id}, json={"upload": None})
    assert answer.status_code == 409, answer.text
    assert len(spooled) == 2 and all(args.file.closed for args in spooled)


@pytest.mark.anyio
async def test_the_clients_send_a_path_from_its_file_not_from_memory(server: Server, tmp_path: Path) -> None:
    """A user uploading a video through our clients never holds it whole in memory."""
    data = os.urandom(20_000_000)
    path = tmp_path / "clip.bin"
    path.write_bytes(data)
    expected = {"sha256": hashlib.sha256(data).hexdigest(), "name": "clip.bin"}
    del data

    client = server.client()
    client.checksum.info  # the schema is read before measuring  # noqa: B018
    tracemalloc.start()
    try:
        task = client.checksum.submit(upload=path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, f"the sync client held {peak / 1e6:.1f} MB to send a 20 MB file"
    assert task.get(timeout=60) == expected

    async with taskserve.AsyncHTTPClient(server.url) as aclient:
        await aclient.checksum.info()
        tracemalloc.start()
        try:
            atask = await aclient.checksum.submit(upload=path)
            apeak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert apeak < 4_000_000, f"the async client held {apeak / 1e6:.1f} MB to send a 20 MB file"
        assert await atask.get(timeout=60) == expected
