"""The HTTP surface facing browsers and the open network (docs/hardening.md), on one real server.

Content types (JSON only as JSON), file results as attachments, ``nosniff`` everywhere, the
``Host`` check, header and body timeouts, the connection cap, JSON for uvicorn's own errors,
NaN in results, and the requests schemathesis found the server and /docs.json disagreeing on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import struct
import sys
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from .conftest import ROOT, Server, ServerFactory, free_port, wait_until

SERVICE = "tests.fuzz_service:FuzzService"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Short timeouts and a small connection cap, so that the tests of them are quick."""
    db = tmp_path_factory.mktemp("db") / "tasks.db"
    port = free_port()
    args = [sys.executable, "-m", "taskserve", "serve", SERVICE, "--port", str(port), "--broker", f"sqlite:///{db}"]
    args += ["--workers", "1", "--header-timeout", "1", "--body-timeout", "1", "--max-connections", "12"]
    args += ["--allowed-host", "127.0.0.1", "--allowed-host", "*.example.test", "--call-timeout", "5"]
    args += ["--max-image-pixels", "1000000", "--max-body-size", "5000000"]
    log = tmp_path_factory.mktemp("hardening") / "server.log"
    srv = Server(args, port, log, {**os.environ, "PYTHONPATH": str(ROOT)}).start()
    yield srv
    srv.stop()


def post(server: Server, path: str, **request: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=30, **request)


def json_error(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.headers
    assert response.headers["x-content-type-options"] == "nosniff"
    body: dict[str, Any] = response.json()
    for word in words:
        assert word in body["error"], body["error"]
    return body


def raw(server: Server, data: bytes, wait: float = 5.0) -> tuple[bytes, float]:
    """What the server writes back to ``data`` before it closes the connection, and how long that took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.settimeout(wait)
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out, time.monotonic() - started


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buf, "PNG")
    return buf.getvalue()


# -- content types ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}],
    ids=["text", "form", "none"],
)
def test_a_json_body_needs_a_json_content_type(server: Server, headers: dict[str, str]) -> None:
    """What any web page may send cross-origin without a preflight is never read as JSON."""
    body = b'{"text": "hi"}'
    json_error(post(server, "/describe", content=body, headers=headers), 415, "application/json")
    assert post(server, "/describe", content=body, headers=JSON).json()["text"] == "hi"
    vendor = {"content-type": "application/vnd.taskserve+json; charset=utf-8"}
    assert post(server, "/describe", content=body, headers=vendor).status_code == 200


@pytest.mark.parametrize("path", ["/ratio/submit_many", "/ratio/wait_many", "/ratio/retry?task_id=x"])
def test_json_only_routes_refuse_other_types(server: Server, path: str) -> None:
    json_error(post(server, path, content=b"[]", headers={"content-type": "text/plain"}), 415, "application/json")


def test_forms_and_multipart_stay_accepted(server: Server) -> None:
    assert post(server, "/describe", data={"text": "from a form", "repeat": "2"}).json()["repeat"] == 2
    answer = post(server, "/checksum", files={"upload": ("a.bin", b"12345", "application/octet-stream")})
    assert answer.json()["sha256"] == hashlib.sha256(b"12345").hexdigest()


# -- results --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["report.html", "logo.svg", "../../x.html"])
def test_a_file_result_is_an_attachment_never_a_page(server: Server, name: str) -> None:
    """A file named by its uploader must not come back as HTML or SVG of this origin (stored XSS)."""
    page = b"<script>alert(document.domain)</script>"
    answer = post(server, "/keep", files={"upload": (name, page, "text/html")})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/octet-stream"
    assert answer.headers["x-content-type-options"] == "nosniff"
    disposition = answer.headers["content-disposition"]
    assert disposition.startswith("attachment;") and "/" not in disposition.replace("UTF-8''", ""), disposition
    assert f'filename="{name.rsplit("/", 1)[-1]}"' in disposition
    assert answer.content == page


def test_an_image_result_stays_inline(server: Server) -> None:
    answer = post(server, "/thumbnail", files={"img": ("a.png", png(20, 10), "image/png")})
    assert answer.headers["content-type"] == "image/png"
    assert "content-disposition" not in answer.headers
    assert Image.open(io.BytesIO(answer.content)).size == (8, 8)


@pytest.mark.parametrize(("path", "args", "expected"), [("/ratio", {"a": 1, "b": 0}, None)])
def test_nan_and_infinity_in_a_result_go_out_as_null(server: Server, path: str, args: Any, expected: Any) -> None:
    assert json.loads(post(server, path, json=args).text) == expected  # strict JSON: no bare NaN
    assert json.loads(post(server, "/stats", json={"values": []}).text) == {"mean": None, "count": 0.0}


# -- headers every answer carries, and the Host check ------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/nowhere", "/docs.json"])
def test_every_answer_says_nosniff(server: Server, path: str) -> None:
    assert httpx.get(f"{server.url}{path}").headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("host", ["evil.test", "127.0.0.1.evil.test:80", "example.test"])
def test_a_foreign_host_is_refused(server: Server, host: str) -> None:
    """--allowed-host: a page of another name that DNS rebinding points at 127.0.0.1 gets nothing."""
    json_error(httpx.get(f"{server.url}/healthz", headers={"host": host}), 400, "--allowed-host")


@pytest.mark.parametrize("host", ["127.0.0.1", "api.example.test:3000", "API.EXAMPLE.TEST"])
def test_an_allowed_host_is_served(server: Server, host: str) -> None:
    assert httpx.get(f"{server.url}/healthz", headers={"host": host}).status_code == 200


# -- the connection: timeouts, cap, malformed requests --------------------------------------------


def _answer(data: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return int(head.split()[1]), json.loads(body)


def test_headers_sent_too_slowly_get_408_and_are_closed(server: Server) -> None:
    data, took = raw(server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    assert _answer(data)[0] == 408 and took < 4
    data, took = raw(server, b"")  # a connection that never says anything is closed quietly
    assert data == b"" and took < 4


def test_a_body_that_stops_arriving_gets_408(server: Server) -> None:
    head = b"POST /describe HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    data, took = raw(server, head + b'Content-Length: 100\r\n\r\n{"text": ')
    status, body = _answer(data)
    assert status == 408 and "stopped arriving" in body["error"] and took < 4


def test_a_malformed_request_gets_json_400(server: Server) -> None:
    status, body = _answer(raw(server, b"NOT HTTP AT ALL\r\n\r\n")[0])
    assert status == 400 and "not valid HTTP" in body["error"]


def test_connections_past_the_cap_get_503(server: Server) -> None:
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(12)]
    try:
        status, body = _answer(raw(server, b"", wait=3)[0])
        assert status == 503 and "limit" in body["error"]
    finally:
        for s in held:
            s.close()
    wait_until(lambda: httpx.get(f"{server.url}/healthz").status_code == 200, 5)


def test_with_the_broker_away_every_route_answers_a_documented_503(make_server: ServerFactory) -> None:
    """Each task route reads the store, so each can answer 503; /docs.json listed it on some only."""
    seen = []
    api = make_server(f"redis://127.0.0.1:{free_port()}/0", workers=0, service=SERVICE)
    docs = httpx.get(f"{api.url}/docs.json").json()["paths"]
    for path, operations in docs.items():
        for method in operations:
            if not path.startswith(("/ratio", "/tasks", "/queues", "/workers", "/readyz")):
                continue  # one endpoint's routes stand for all; the rest never read the store
            args: dict[str, Any] = {"params": {"task_id": "x", "timeout": "0"}}
            if method in ("post", "put"):
                args["json"] = {"task_ids": ["x"]} if path.endswith("/wait_many") else {}
                args["json"] = [] if path.endswith("/submit_many") else args["json"]
            answer = httpx.request(method.upper(), f"{api.url}{path}", timeout=30, **args)
            if answer.status_code == 503:
                assert "503" in operations[method]["responses"], (method, path)
                json_error(answer, 503, "Redis")
                seen.append(path)
    assert "/ratio/status" in seen and "/ratio/cancel" in seen


# -- bounded inputs ------------------------------------------------------------------------------


def test_a_decompression_bomb_is_refused_before_decoding(server: Server) -> None:
    """A PNG whose header claims 40000 x 40000 pixels (1.6 G) over a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    answer = post(server, "/caption/submit", files={"img": ("bomb.png", bomb + b"\0" * 64, "image/png")})
    assert answer.status_code in (413, 422)
    json_error(answer, answer.status_code, "img")


def test_a_multipart_boundary_too_long_to_parse_is_422_not_500(server: Server) -> None:
    """python-multipart refuses a boundary over 256 characters when its parser is made, not while parsing."""
    boundary = "b" * 300
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="upload"; filename="a"\r\n\r\nhi\r\n--{boundary}--\r\n'
    )
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    json_error(post(server, "/checksum/submit", content=body.encode(), headers=headers), 422, "multipart", "256")


@pytest.mark.parametrize("form", ["list", "typed", "npy"])
def test_an_array_of_more_dimensions_than_the_worker_reads_is_refused_at_submit(server: Server, form: str) -> None:
    """At most 32 dimensions, as in the typed form: a 40-level nested list was accepted, then failed in the worker."""
    import numpy as np

    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    if form == "npy":
        buf = io.BytesIO()
        np.save(buf, np.zeros((1,) * 40, dtype="<f8"), allow_pickle=False)
        answer = post(server, "/stats/submit", files={"values": ("a.npy", buf.getvalue(), "application/octet-stream")})
    else:
        values = deep if form == "list" else {"dtype": "float64", "data": deep}
        answer = post(server, "/stats/submit", json={"values": values})
    json_error(answer, 422, "values", "32 dimensions")


def test_a_file_where_text_is_expected_is_called_a_file(server: Server) -> None:
    """The message named the server's internal class (``got FileArg``), which tells the sender nothing."""
    answer = post(server, "/describe", files={"text": ("a.txt", b"hi", "text/plain")})
    body = json_error(answer, 422, "text", "a file")
    assert "FileArg" not in body["error"]


@pytest.mark.parametrize(("method", "path", "allowed"), [("GET", "/describe", "POST"), ("GET", "/ratio/cancel", "PUT")])
def test_a_wrong_method_is_told_which_ones_the_path_takes(server: Server, method: str, path: str, allowed: str) -> None:
    answer = httpx.request(method, f"{server.url}{path}")
    json_error(answer, 405, method, allowed)


def test_json_nesting_is_bounded(server: Server) -> None:
    deep = "[" * 200 + "]" * 200
    body = f'{{"query": {{"text": "x", "tags": {deep}}}}}'.encode()
    json_error(post(server, "/search/submit", content=body, headers=JSON), 422, "deeper")


def test_a_large_upload_goes_through_the_spooled_body(server: Server) -> None:
    """Past 1 MiB the body is read into a temporary file; what arrives is the same."""
    data = os.urandom(3 * 1024 * 1024)
    answer = post(server, "/checksum", files={"upload": ("big.bin", data, "application/octet-stream")})
    assert answer.json() == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# -- found by fuzzing /docs.json (tests/test_fuzz.py) ------------------------------------------


@pytest.mark.parametrize(
    "query",
    ["timeout=-1", "timeout=nan", "timeout=1e400", "timeout=abc", "task_id="],
)
def test_bad_wait_parameters_are_400_not_500(server: Server, query: str) -> None:
    task_id = "task_id=x&" if not query.startswith("task_id") else ""
    json_error(httpx.get(f"{server.url}/ratio/wait?{task_id}{query}"), 400)


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=", "status=bogus", "status=", "tag=nokey", "tag="])
def test_bad_listing_parameters_are_422(server: Server, query: str) -> None:
    assert httpx.get(f"{server.url}/tasks?{query}").status_code == 422


def test_an_unknown_cursor_is_no_server_error(server: Server) -> None:
    assert httpx.get(f"{server.url}/tasks?cursor=%00%FF-not-a-cursor").status_code < 500


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"a": 1, "b": False}, "b"),
        ({"a": "1.5", "b": 1}, "a"),
        ({"a": {"x": 1, "y": True}, "b": {"x": 1, "y": 2}}, "y"),
    ],
)
def test_values_of_another_json_type_are_refused(server: Server, args: Any, field: str) -> None:
    """The schema says number: ``false`` and ``"1.5"`` are refused, not converted to 0.0 and 1.5."""
    path = "/midpoint/submit" if "x" in str(args) else "/ratio/submit"
    json_error(post(server, path, json=args), 422, field)


def test_a_direct_call_ended_by_its_callers_deadline_is_409_not_500(server: Server) -> None:
    answer = post(server, "/ratio?deadline=2000-01-01T00:00:00Z", json={"a": 1, "b": 2})
    body = json_error(answer, 409, "DeadlineExceeded")
    assert body["status"] == "failure"


def test_a_direct_call_starting_after_its_time_limit_is_refused(server: Server) -> None:
    json_error(post(server, "/ratio?delay=60", json={"a": 1, "b": 2}), 422, "submit it instead")


def test_delay_and_run_at_together_start_at_the_later(server: Server) -> None:
    answer = post(server, "/ratio/submit?delay=3600&run_at=2000-01-01T00:00:00Z", json={"a": 1, "b": 2})
    status = httpx.get(f"{server.url}/ratio/status", params={"task_id": answer.json()["task_id"]}).json()
    assert status["run_at"] > "2026" and status["status"] == "pending"
    httpx.put(f"{server.url}/ratio/cancel", params={"task_id": status["task_id"]})


@pytest.mark.parametrize(
    "url",
    ["https://host/\u00bc", "HTTP://host/", "https://user@host/", "https:///x", "http://host:65536/", "http://h:99999"],
)
def test_a_webhook_must_be_a_plain_http_url(server: Server, url: str) -> None:
    json_error(post(server, "/ratio/submit", params={"webhook": url}, json={"a": 1, "b": 2}), 422, "webhook")


@pytest.mark.parametrize("event_id", ["x", "1.x", " 1", "1_0", "-1"])
def test_a_bad_last_event_id_is_400(server: Server, event_id: str) -> None:
    task_id = post(server, "/ratio/submit", json={"a": 1, "b": 2}).json()["task_id"]
    params = {"task_id": task_id, "last_event_id": event_id}  # as the header; " 1" cannot be one
    json_error(httpx.get(f"{server.url}/ratio/events", params=params), 400, "Last-Event-ID")


def test_wait_many_reads_the_document_s_integers_and_clamps_its_timeout(server: Server) -> None:
    body = {"task_ids": ["unknown"], "min_done": 2.0, "timeout": 301}
    assert post(server, "/ratio/wait_many", json=body).json()["missing"] == ["unknown"]
