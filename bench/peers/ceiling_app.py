"""The ceiling: the cheapest server shaped like taskserve's task API.

Tasks live in a dict and are reported done the moment they are submitted, so its figures are
what this machine, uvicorn and the load generator manage with no queue and no worker at all.
Run: `uvicorn bench.peers.ceiling_app:app`.
"""

from __future__ import annotations

import itertools
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

_ids = itertools.count()
_results: dict[str, int] = {}


def _store(body: dict) -> dict:
    task_id = f"c{next(_ids)}"
    _results[task_id] = body.get("x")
    return {"task_id": task_id, "status": "pending"}


async def submit(request: Request) -> Response:
    return JSONResponse(_store(json.loads(await request.body())))


async def submit_many(request: Request) -> Response:
    return JSONResponse({"tasks": [_store(item) for item in json.loads(await request.body())]})


async def status(request: Request) -> Response:
    task_id = request.query_params["task_id"]
    if task_id not in _results:
        return JSONResponse({"error": f"No such task: {task_id!r}"}, status_code=404)
    return JSONResponse({"task_id": task_id, "status": "success"})


async def get(request: Request) -> Response:
    task_id = request.query_params["task_id"]
    if task_id not in _results:
        return JSONResponse({"error": f"No such task: {task_id!r}"}, status_code=404)
    return JSONResponse(_results[task_id])


async def ready(request: Request) -> Response:
    return JSONResponse({"stored": len(_results)})


app = Starlette(
    routes=[
        Route("/noop/submit", submit, methods=["POST"]),
        Route("/noop/submit_many", submit_many, methods=["POST"]),
        Route("/noop/status", status),
        Route("/noop/wait", status),
        Route("/noop/get", get),
        Route("/readyz", ready),
    ]
)
