"""BentoML's own clients driving a taskserve server; run by tests/test_bentoml.py with the BentoML venv's Python.

``python tests/bento_clients.py async|sync URL WORKDIR`` runs one client through the task
workflow and prints what it saw as one JSON object, for the test to assert on.
``python tests/bento_clients.py define`` prints what ``load_service`` makes of the service file.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from PIL import Image

DEADLINE = 20.0


def _png(color: tuple[int, int, int]) -> Image.Image:
    buf = io.BytesIO()
    Image.new("RGB", (3, 2), color).save(buf, "PNG")
    buf.seek(0)
    return Image.open(buf)


def _final(status: Any) -> bool:
    return status.value in ("completed", "failed", "canceled")


async def run_async(url: str, workdir: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    async with bentoml.AsyncHTTPClient(url) as client:
        seen["shout"] = await client.shout(text="hi there", times=2)
        seen["caption"] = await client.caption(prompt={"text": "a red fox"})
        seen["area"] = await client.area(length=3.0, width=2.0)
        seen["dtype_of"] = await client.dtype_of(values=np.array([1.0, 2.0]))
        render = await client.render.submit(prompt="fox", size=5)
        seen["statuses"] = [(await render.get_status()).value]
        deadline = time.monotonic() + DEADLINE
        while not _final(status := await render.get_status()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        seen["statuses"].append(status.value)
        image = await render.get()
        seen["render"] = [type(image).__name__, list(image.size), list(image.getpixel((0, 0)))]
        invert = await client.invert.submit(image=_png((10, 20, 30)), note="multipart text")
        seen["invert"] = list((await _result(invert)).convert("RGB").getpixel((0, 0)))
        scaled = await _result(await client.scale.submit(values=np.array([[1.5, 2.0], [3.0, 4.0]]), factor=2))
        seen["scale"] = [type(scaled).__name__, scaled.tolist()]
        document = workdir / "notes.txt"
        document.write_text("eleven char")
        seen["count_bytes"] = await _result(await client.count_bytes.submit(document=document, label="doc"))
        seen["story"] = await _result(await client.story.submit(prompt={"text": "once", "steps": 3}))
        seen["story_direct"] = await client.story(prompt={"text": "twice", "steps": 2})
        explode = await client.explode.submit(reason="bad input")
        seen["explode_status"] = (await _wait(explode)).value
        seen["explode_get"] = await _error(explode.get())
        retried = await explode.retry()
        seen["retry_new_id"] = retried.id != explode.id
        seen["retry_status"] = (await _wait(retried)).value
        nap = await client.nap.submit(seconds=30)
        while (await nap.get_status()).value != "in_progress" and time.monotonic() < deadline + DEADLINE:
            await asyncio.sleep(0.05)
        seen["nap_get_early"] = await _error(nap.get())
        await nap.cancel()
        seen["nap_after_cancel"] = (await _wait(nap)).value
        items = [["a"], ["bb", "ccc"], ["dddd"], ["eeeee", "ffffff"]]
        tasks = await asyncio.gather(*(client.lengths.submit(texts=texts) for texts in items))
        seen["lengths"] = [await _result(task) for task in tasks]
        seen["lengths_ids"] = [task.id for task in tasks]
        seen["lengths_direct"] = await client.lengths(texts=["xy", "z"])
        started = time.monotonic()
        seen["double"] = (await client.double(values=np.array([1.0, 2.0]))).tolist()
        seen["double_seconds"] = time.monotonic() - started
        arrivals = []
        async for chunk in client.tokens(prompt="w", n=3, pause=0.4):
            arrivals.append([chunk, time.monotonic()])
        seen["tokens"] = "".join(chunk for chunk, _ in arrivals)
        seen["tokens_spread"] = arrivals[-1][1] - arrivals[0][1]  # the first came before the last was made
        reversed_file = await client.reverse_file(document=document)
        seen["reverse_file"] = Path(reversed_file).read_text()
        seen["bad_input"] = await _error(client.shout(text="x", times="many"))
        seen["total"] = await client.total([1.0, 2.5])
    return seen


async def _wait(task: Any) -> Any:
    deadline = time.monotonic() + DEADLINE
    while not _final(status := await task.get_status()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return status


async def _result(task: Any) -> Any:
    await _wait(task)
    return await task.get()


async def _error(call: Any) -> list[Any]:
    try:
        await call
    except bentoml.exceptions.BentoMLException as exc:
        return [type(exc).__name__, int(exc.error_code)]
    return ["no error", 0]


def run_sync(url: str, workdir: Path) -> dict[str, Any]:
    # BentoML 1.4.40's SyncHTTPClient.submit() closes files through an attribute it lacks, so every
    # sync submit raises AttributeError and loses its handle (bentoml/BentoML#5706). A fixed BentoML
    # needs none of this; here the missing attribute is given, as that fix does.
    bentoml.SyncHTTPClient._opened_files = []  # type: ignore[attr-defined]
    seen: dict[str, Any] = {}
    with bentoml.SyncHTTPClient(url) as client:
        seen["shout"] = client.shout(text="sync", times=1)
        task = client.invert.submit(image=_png((200, 100, 0)))
        seen["invert_status"] = _wait_sync(task).value
        seen["invert"] = list(task.get().convert("RGB").getpixel((0, 0)))
        task = client.story.submit(prompt={"text": "sync", "steps": 2})
        seen["story_status"] = _wait_sync(task).value
        seen["story"] = task.get()
        seen["story_retry"] = _wait_sync(task.retry()).value
        seen["scale_direct"] = client.scale(values=np.array([1, 2, 3]), factor=0.5).tolist()
        seen["tokens"] = "".join(client.tokens(prompt="s", n=2))
        task = client.explode.submit(reason="sync")
        seen["explode_status"] = _wait_sync(task).value
        try:
            task.get()
            seen["explode_get"] = None
        except bentoml.exceptions.BentoMLException as exc:
            seen["explode_get"] = int(exc.error_code)
    return seen


def _wait_sync(task: Any) -> Any:
    deadline = time.monotonic() + DEADLINE
    while not _final(status := task.get_status()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return status


def define() -> dict[str, Any]:
    from taskserve.service import load_service

    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("taskserve.bentoml").addHandler(handler)
    out: dict[str, Any] = {}
    for name in ("Studio", "Gateway"):
        warnings.clear()
        service = load_service(f"tests.bento_service:{name}")
        out[name] = {
            "name": service.name,
            "workers": service.workers,
            "resources": service.resources,
            "endpoints": {
                ep.name: {"route": ep.route, "task": ep.is_task, "timeout": ep.timeout, "batchable": ep.batchable}
                for ep in service.endpoints
            },
            "inputs": {ep.name: [p.name for p in ep.codec.params] for ep in service.endpoints},
            "warnings": list(warnings),
        }
    # Gateway asks for a GPU a worker; on a host without one it runs on the CPU, as under BentoML.
    from taskserve.cli import _worker_plan

    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    out["Gateway"]["plan_without_gpus"] = _worker_plan(load_service("tests.bento_service:Gateway"), None, None)
    return out


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "define":
        result = define()
    elif mode == "async":
        result = asyncio.run(run_async(sys.argv[2], Path(sys.argv[3])))
    else:
        result = run_sync(sys.argv[2], Path(sys.argv[3]))
    print(json.dumps(result))
