"""One table from exceptions to HTTP answers; every error body is JSON with an ``error``."""

from __future__ import annotations

import logging
import math
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from ..exceptions import (
    IdempotencyConflict,
    InvalidTransition,
    PayloadTooLarge,
    QueueFull,
    QueueUnavailable,
    TaskNotFound,
    ValidationFailed,
)

logger = logging.getLogger("taskserve.server")


def _body(exc: Exception, **extra: Any) -> dict[str, Any]:
    return {"error": str(exc), **extra}


async def validation_failed(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationFailed)
    return JSONResponse(_body(exc, detail=exc.detail), status_code=422)


async def not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(_body(exc), status_code=404)


async def invalid_transition(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidTransition)
    status = getattr(exc.status, "value", exc.status)
    return JSONResponse(_body(exc, status=status), status_code=409)


async def conflict(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, IdempotencyConflict)
    return JSONResponse(_body(exc, task_id=exc.task_id, idempotency_key=exc.key), status_code=409)


async def queue_full(request: Request, exc: Exception) -> JSONResponse:
    """429 with an estimate of when there will be room; nothing was queued."""
    assert isinstance(exc, QueueFull)
    seconds = exc.retry_after
    if seconds is None:
        seconds = await request.app.state.drain.retry_after(exc.route, exc.excess)
    seconds = max(1, math.ceil(seconds))
    return JSONResponse(_body(exc, retry_after=seconds), status_code=429, headers={"Retry-After": str(seconds)})


async def unavailable(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("queue unavailable: %s", exc)
    return JSONResponse(_body(exc), status_code=503, headers={"Retry-After": "1"})


async def too_large(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(_body(exc), status_code=413)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    message = exc.detail
    if exc.status_code == 404 and message == "Not Found":
        message = f"No endpoint at {request.url.path!r}; GET /schema.json lists the endpoints."
    elif exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow")
        use = f"; it takes {allow}" if allow else ""
        message = f"{request.method} is not allowed on {request.url.path!r}{use}."
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


async def client_gone(request: Request, exc: Exception) -> JSONResponse:
    # Nobody reads this answer; what matters is that a hang-up is not logged as a server fault.
    logger.debug("client disconnected before sending all of %s %s", request.method, request.url.path)
    return JSONResponse({"error": "The client disconnected before the request was complete."}, status_code=400)


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": f"Internal server error: {type(exc).__name__}."}, status_code=500)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ValidationFailed: validation_failed,
    TaskNotFound: not_found,
    InvalidTransition: invalid_transition,
    IdempotencyConflict: conflict,
    QueueFull: queue_full,
    QueueUnavailable: unavailable,
    PayloadTooLarge: too_large,
    HTTPException: http_error,
    ClientDisconnect: client_gone,
    Exception: server_error,
}
