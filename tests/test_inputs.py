"""Bad input and data fidelity: what a client sends is refused at submit (422/413, never 500) or runs as sent."""

from __future__ import annotations

import base64
import io
import os
import socket
import stat
import struct
import sys
import tempfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import AfterValidator

import taskserve
from taskserve.client._base import EndpointInfo, decode_result
from taskserve.queue import Queue
from taskserve.server import create_app
from taskserve.service import load_service

from .conftest import ROOT, SERVICE, Server, ServerFactory, free_port, validate_openapi, wait_until

LIMITS = ["--max-array-bytes", "1000000", "--max-image-pixels", "1000000"]
FORM = "application/x-www-form-urlencoded"
JSON = {"content-type": "application/json"}
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One SQLite server with small input limits; validation does not depend on the broker."""
    db = tmp_path_factory.mktemp("db") / "tasks.db"
    port = free_port()
    args = [sys.executable, "-m", "taskserve", "serve", SERVICE, "--port", str(port), "--broker", f"sqlite:///{db}"]
    args += ["--workers", "1", "--concurrency", "2", "--max-body-size", "3000000", *LIMITS]
    log = tmp_path_factory.mktemp("inputs") / "server.log"
    srv = Server(args, port, log, {**os.environ, "PYTHONPATH": str(ROOT)}).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[taskserve.SyncHTTPClient]:
    with taskserve.SyncHTTPClient(server.url) as c:
        yield c


def call(server: Server, route: str, **request: Any) -> httpx.Response:
    """POST /{route} (submit and wait for the result)."""
    return httpx.post(f"{server.url}/{route}", timeout=30, **request)


def refused(response: httpx.Response, *words: str) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    body: dict[str, Any] = response.json()
    for word in words:
        assert word in body["error"], body["error"]
    return body


def npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def npy_claiming(shape: tuple[int, ...]) -> bytes:
    """A .npy file whose header claims ``shape`` (float64) over 32 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buf.getvalue() + bytes(32)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def nested(levels: int) -> Any:
    """A value of ``levels`` nested lists."""
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


# -- arrays keep dtype and shape (issue 8 item 6) --------------------------------------------


@pytest.mark.parametrize("dtype", ["bool", "int8", "uint8", "int16", "uint32", "float16", "float32", "float64"])
def test_arrays_keep_dtype_and_shape_through_the_client(client: taskserve.SyncHTTPClient, dtype: str) -> None:
    arr = np.arange(6).reshape(2, 3).astype(dtype)
    info = client.array_info.submit(arr=arr).get(timeout=20)
    assert info == {"dtype": dtype, "shape": [2, 3], "writeable": True}
    [task] = client.array_info.submit_many([{"arr": arr}])
    assert task.get(timeout=20)["dtype"] == dtype


@pytest.mark.anyio
async def test_the_async_client_keeps_dtype_and_shape(server: Server) -> None:
    async with taskserve.AsyncHTTPClient(server.url) as client:
        result = await client.scale(values=np.ones((2, 1), np.float16), factor=3)
    assert result.dtype == np.float32 and result.tolist() == [[3.0], [3.0]]


def test_array_results_keep_dtype_and_shape(server: Server, client: taskserve.SyncHTTPClient) -> None:
    result = client.transpose.submit(matrix=np.arange(6, dtype=np.uint8).reshape(2, 3)).get(timeout=20)
    assert result.dtype == np.uint8 and result.tolist() == [[0, 3], [1, 4], [2, 5]]
    body = call(server, "transpose", json={"matrix": [[1.5, 2], [3, 4]]}).json()
    assert body["dtype"] == "float64" and body["shape"] == [2, 2]
    assert np.frombuffer(base64.b64decode(body["data"]), "<f8").tolist() == [1.5, 3, 2, 4]


@pytest.mark.parametrize(
    ("arr", "dtype", "shape"),
    [
        ([[1, 2, 3]], "int64", [1, 3]),
        ({"dtype": "float32", "shape": [2], "data": [1.5, 2]}, "float32", [2]),
        ({"dtype": "uint8", "data": [[0, 255]]}, "uint8", [1, 2]),
        ({"dtype": "int16", "shape": [2, 2], "data": base64.b64encode(b"\1\0\2\0\3\0\4\0").decode()}, "int16", [2, 2]),
    ],
)
def test_json_array_forms(server: Server, arr: Any, dtype: str, shape: list[int]) -> None:
    r = call(server, "array_info", json={"arr": arr})
    assert r.status_code == 200, r.text
    assert r.json() == {"dtype": dtype, "shape": shape, "writeable": True}


def test_npy_parts_in_multipart(server: Server) -> None:
    part = npy(np.asfortranarray(np.arange(6, dtype=">f2").reshape(2, 3)))
    r = call(server, "array_info", files={"arr": ("a.npy", part, "application/x-npy")})
    assert r.json() == {"dtype": "float16", "shape": [2, 3], "writeable": True}


def test_the_annotated_dtype_is_honoured(server: Server) -> None:
    body = call(server, "scale", json={"values": [[1, 2], [3, 4]]}).json()
    assert body["dtype"] == "float32" and body["shape"] == [2, 2]
    refused(
        call(
            server, "scale", content=b'{"values": {"dtype": "float64", "data": [[1.5]]}, "factor": 1e400}', headers=JSON
        ),
        "factor",
    )
    refused(call(server, "array_info", json={"arr": {"dtype": "uint8", "data": [256]}}), "uint8")
    refused(call(server, "scale", json={"values": [1, 1e300]}), "range of float32")


def test_openapi_documents_the_array_and_file_forms(server: Server) -> None:
    docs = httpx.get(f"{server.url}/docs.json").json()
    validate_openapi(docs)
    assert docs["components"]["schemas"]["NDArray"]["properties"]["dtype"]["enum"][:2] == ["bool", "int8"]
    result = docs["paths"]["/transpose/get"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert result == {"$ref": "#/components/schemas/NDArray"}
    multipart = docs["paths"]["/invert/submit"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "image/png" in multipart["encoding"]["img"]["contentType"]
    assert "--max-image-pixels" in docs["info"]["description"]


# -- arrays cannot cost more than their limits (S1, 9a) -------------------------------------


@pytest.mark.parametrize("dtype", [5, "zz", [["a", "f8"]], "g", "(6000,6000)f8", "O", "U8", "c16", "V8", "M8"])
def test_dtypes_outside_the_allow_list_are_refused(server: Server, dtype: Any) -> None:
    refused(call(server, "array_info", json={"arr": {"data": [0], "dtype": dtype}}), "dtype", "float32")
    assert httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200


@pytest.mark.parametrize(
    "arr",
    [
        {"dtype": "float64", "shape": [100000, 100000], "data": "AAAAAAAAAAA="},
        {"dtype": "float64", "shape": [200_000], "data": base64.b64encode(bytes(1_600_000)).decode()},
        [0.5] * 200_000,
    ],
)
def test_arrays_over_the_limit_are_refused_naming_it(server: Server, arr: Any) -> None:
    detail = refused(call(server, "array_info", json={"arr": arr}), "--max-array-")["detail"]
    assert detail[0]["type"] == "too_large"


def test_npy_headers_are_checked_before_reading(server: Server) -> None:
    huge = npy_claiming((99_999_999_999,))
    refused(call(server, "array_info", files={"arr": ("a.npy", huge, "application/x-npy")}), "--max-array-")
    pickled = npy(np.array([{"x": 1}], dtype=object), allow_pickle=True)
    refused(call(server, "array_info", files={"arr": ("a.npy", pickled, "application/x-npy")}), "dtype")
    refused(call(server, "array_info", files={"arr": ("a.npy", b"not numpy", "application/x-npy")}), ".npy")


@pytest.mark.parametrize(
    "arr",
    [
        {"dtype": "float32", "shape": [3], "data": [1, 2]},
        {"dtype": "float32", "shape": [3], "data": "AAAA"},
        {"dtype": "float32", "shape": [-1], "data": []},
        {"dtype": "float32", "data": "AAAA"},
        {"dtype": "float32", "data": [1], "extra": 1},
        [[1, 2], [3]],
        [{"a": 1}],
        "text",
    ],
)
def test_malformed_arrays_are_422(server: Server, arr: Any) -> None:
    refused(call(server, "array_info", json={"arr": arr}), "arr")


# -- images (S2, 8) -------------------------------------------------------------------------


def test_postscript_is_never_opened(server: Server) -> None:
    r = httpx.post(f"{server.url}/invert/submit", files={"img": ("x.eps", EPS, "image/png")})
    refused(r, "img", "PNG, JPEG")
    codec = load_service(SERVICE).by_route["/invert"].codec
    stored = b'{"img": {"data": "%s", "filename": "x.eps"}}' % base64.b64encode(EPS)
    with pytest.raises(ValueError, match="PNG, JPEG"):
        codec.load(stored, "unused")  # the worker: even what a store holds is opened in safe formats only
    response = httpx.Response(200, content=EPS, headers={"content-type": "image/png"})
    with pytest.raises(ValueError, match="PNG, JPEG"):
        decode_result(EndpointInfo("invert", "/invert", True, "image"), response)  # the client


@pytest.mark.parametrize(("image", "pixels"), [(png_claiming(100_000, 100_000), 10**10), (png(1001, 1000), 1_001_000)])
def test_images_over_the_pixel_limit_are_refused_naming_it(server: Server, image: bytes, pixels: int) -> None:
    r = httpx.post(f"{server.url}/invert/submit", files={"img": ("big.png", image, "image/png")})
    body = refused(r, "img", "1000000", "--max-image-pixels")
    assert body["detail"][0]["type"] == "too_large"
    r = httpx.post(f"{server.url}/invert/submit", json={"img": base64.b64encode(image).decode()})
    refused(r, "--max-image-pixels")


def test_an_image_at_the_pixel_limit_runs(server: Server) -> None:
    r = call(server, "invert", files={"img": ("ok.png", png(1000, 1000), "image/png")})
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (1000, 1000)


# -- the client writes only files it names (S3) ---------------------------------------------


@pytest.mark.parametrize("header", ["{tmp}/evil", "../../evil", "a/b", "x\0y"])
def test_file_results_go_to_a_new_private_file(tmp_path: Path, header: str) -> None:
    header = header.format(tmp=tmp_path)
    response = httpx.Response(200, content=b"data", headers={"content-type": "text/plain", "x-task-id": "t"})
    response.headers["x-task-id"] = header.replace("\0", "%00")
    path = decode_result(EndpointInfo("f", "/f", True, "file"), response)
    try:
        assert path.read_bytes() == b"data"
        assert path.parent == Path(tempfile.gettempdir()) and path.name.startswith("taskserve-result-")
        assert "evil" not in path.name and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert not (tmp_path / "evil").exists()
    finally:
        path.unlink()


# -- JSON depth, numbers, strings (9, 9a, 5f) -----------------------------------------------


@pytest.mark.parametrize("levels", [64, 299, 100_000])
def test_nesting_past_the_limit_is_422(server: Server, levels: int) -> None:
    body = b'{"value": ' + b"[" * levels + b"]" * levels + b"}"  # levels + 1 deep, with the outer object
    refused(httpx.post(f"{server.url}/depth/submit", content=body, headers=JSON), "limit of 64")
    refused(httpx.post(f"{server.url}/depth/submit_many", json=[{"value": nested(64)}]), "item 0")


def test_a_task_nested_to_the_limit_runs(client: taskserve.SyncHTTPClient) -> None:
    assert client.depth.submit(value=nested(63)).get(timeout=20) == 63  # 64 levels with the arguments object
    assert client.depth.submit(value={"a": nested(62)}).get(timeout=20) == 63


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b'{"x": NaN}', "NaN and Infinity are not JSON numbers"),
        (b'{"x": Infinity}', "NaN and Infinity are not JSON numbers"),
        (b'{"x": -Infinity}', "NaN and Infinity are not JSON numbers"),
        (b'{"x": 1e400}', "x: inf is not a finite number"),
        (b'{"x": "NaN"}', "x: expected a number, got str"),  # the schema says number: no string is one
        (b'{"x": 1, "weights": {"a": 1e400}}', "weights.a: inf"),
        (b'{"x": 1, "weights": {"a": "-inf"}}', "weights.a: -inf"),
    ],
)
def test_non_finite_numbers_are_refused(server: Server, body: bytes, where: str) -> None:
    refused(httpx.post(f"{server.url}/halve/submit", content=body, headers=JSON), where)


def test_non_finite_numbers_in_models_forms_and_batches_are_refused(server: Server) -> None:
    refused(call(server, "midpoint", json={"a": {"x": "nan", "y": 0}, "b": {"x": 0, "y": 0}}), "a.x")
    refused(call(server, "halve", data={"x": "inf"}), "x")
    refused(call(server, "halve", files={"f": ("f", b"")}, data={"x": "NaN"}), "x")
    refused(httpx.post(f"{server.url}/halve/submit_many", content=b'[{"x": 1}, {"x": 1e999}]', headers=JSON), "item 1")
    assert call(server, "halve", data={"x": "3"}).json() == 1.5


@pytest.mark.parametrize(
    "request_args",
    [
        {"content": b'{"text": "\\ud800"}', "headers": JSON},
        {"content": b'{"text": "\\udc00 and more"}', "headers": JSON},
        {"files": {"text": (None, b"\xff\xfe")}},
        {"content": b"text=%ff", "headers": {"content-type": FORM}},
    ],
)
def test_text_that_is_not_unicode_is_422(server: Server, request_args: dict[str, Any]) -> None:
    refused(httpx.post(f"{server.url}/echo/submit", **request_args))


def test_a_surrogate_pair_is_text(server: Server) -> None:
    assert call(server, "echo", content=b'{"text": "\\ud83d\\ude00"}', headers=JSON).json() == "\U0001f600"


# -- uploads (9a) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("..", "upload.bin"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\notes.txt", "notes.txt"),
        ("a\0b.txt", "ab.txt"),
        ("x" * 300 + ".txt", "x" * 251 + ".txt"),
    ],
)
def test_upload_filenames_are_made_safe_at_submit(server: Server, filename: str, expected: str) -> None:
    r = call(server, "file_info", json={"upload": {"data": base64.b64encode(b"hello").decode(), "filename": filename}})
    assert r.status_code == 200, r.text
    assert r.json() == {"name": expected, "size": 5, "head": "hello"}


def test_multipart_filenames_are_made_safe_too(server: Server) -> None:
    r = call(server, "file_info", files={"upload": ("../../x.txt", b"hello", "text/plain")})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "x.txt"


def test_a_client_that_hangs_up_mid_upload_is_not_a_server_error(make_server: ServerFactory, tmp_path: Path) -> None:
    srv = make_server(f"sqlite:///{tmp_path / 'tasks.db'}", "--log-level", "debug")
    head = b"POST /reverse_bytes/submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(head + b'Content-Length: 100000\r\n\r\n{"data": "' + b"A" * 2000)
    wait_until(lambda: "client disconnected" in srv.log.read_text())
    assert httpx.get(f"{srv.url}/healthz").status_code == 200
    log = srv.log.read_text()
    assert "Traceback" not in log and "unhandled" not in log


# -- every input path: faults are 4xx with a message ----------------------------------------


@pytest.mark.parametrize(
    ("path", "request_args"),
    [
        ("/add/submit", {"content": b"[1, 2]"}),
        ("/add/submit", {"content": b"12" * 5000 + b"x"}),
        ("/add/submit", {"content": b'{"a": ' + b"9" * 5000 + b"}"}),
        ("/add/submit", {"content": b"\xff\xfe{}"}),
        ("/add/submit", {"content": b'{"a": 1}', "headers": {"content-type": "application/xml"}}),
        ("/add/submit", {"content": b"--x\r\n\r\n", "headers": {"content-type": "multipart/form-data"}}),
        ("/add/submit", {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}),
        ("/add/submit", {"content": b"&".join(b"a%d=1" % i for i in range(1100)), "headers": {"content-type": FORM}}),
        ("/add/submit", {"files": {f"f{i}": (None, b"1") for i in range(1001)}}),
        ("/add/submit_many", {"content": b'{"a": 1}'}),
        ("/add/submit_many", {"content": b"[1, 2]"}),
        ("/add/submit_many", {"content": b"[" + b"{}," * 10_000 + b"{}]"}),
        ("/echo/submit", {"json": {"text": "x", "text ": "y"}}),
        ("/reverse_bytes/submit", {"json": {"data": "not base64!"}}),
        ("/file_info/submit", {"json": {"upload": {"data": 5}}}),
    ],
)
def test_faults_on_every_input_path_are_4xx_with_a_message(
    server: Server, path: str, request_args: dict[str, Any]
) -> None:
    r = httpx.post(server.url + path, **request_args)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]


@pytest.mark.parametrize("timeout", ["nan", "inf", "1e400", "-1", "x", ""])
def test_bad_wait_timeouts_are_400(server: Server, timeout: str) -> None:
    r = httpx.get(f"{server.url}/add/wait", params={"task_id": "x", "timeout": timeout})
    assert r.status_code == 400 and "timeout" in r.json()["error"]


# -- validation stays off the event loop when it may take a while (S1) -----------------------

THREADS: list[int] = []


def _note_thread(value: str) -> str:
    THREADS.append(threading.get_ident())
    return value


Noted = Annotated[str, AfterValidator(_note_thread)]


@taskserve.service(name="threads")
class ThreadService:
    @taskserve.task
    def text(self, text: Noted) -> int:
        return len(text)

    @taskserve.task
    def array(self, arr: np.ndarray, text: Noted) -> int:
        return len(text)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("route", "body", "on_loop"),
    [
        ("/text/submit", {"text": "small"}, True),
        ("/text/submit", {"text": "x" * 100_000}, False),
        ("/array/submit", {"arr": [1], "text": "small"}, False),
    ],
)
async def test_large_or_binary_input_is_validated_off_the_event_loop(
    tmp_path: Path, route: str, body: dict[str, Any], on_loop: bool
) -> None:
    queue = Queue.from_url(f"sqlite:///{tmp_path / 'tasks.db'}")
    await queue.connect()
    app = create_app(load_service("tests.test_inputs:ThreadService"), queue, maintenance=False)
    THREADS.clear()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            r = await http.post(route, json=body)
    finally:
        await queue.close()
    assert r.status_code == 200, r.text
    assert len(THREADS) == 1
    assert (THREADS[0] == threading.get_ident()) is on_loop
