"""Webhooks (SPEC §8): what the server POSTs when a task with ``webhook=URL`` ends, how it is
signed, how a receiver checks it, and the loop that sends the deliveries the store holds.

Signed as Standard Webhooks (https://www.standardwebhooks.com) sign: ``webhook-id`` is the same
on every try of one delivery (a receiver drops repeats by it), ``webhook-timestamp`` is the
try's own time, and ``webhook-signature`` is ``v1,`` and the base64 HMAC-SHA256 of
``"{id}.{timestamp}.{body}"`` under the key that follows ``whsec_`` in the secret, base64-decoded.

Delivery is at least once: the store holds each pending delivery in its task's record (made
due by the write that ends the task), every API server takes due ones under a short lease,
and a try that fails or dies with its process is made again, with back-off, up to ``tries``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from . import __version__
from ._types import Result, TaskRecord, TaskStatus, iso
from .exceptions import QueueUnavailable, TaskNotFound, WebhookVerificationError

if TYPE_CHECKING:
    from .queue.base import Queue

logger = logging.getLogger("taskserve.webhooks")

DEFAULT_TRIES = 6
DEFAULT_RETRY_DELAY = 5.0  # seconds before the first retry
# Each retry waits this many times longer than the one before: with the defaults the retries
# come 5 s, 25 s, about 2 and 10 minutes, and 52 minutes apart, the last one about an hour
# after the first try.
BACKOFF = 5.0
DEFAULT_TIMEOUT = 10.0  # seconds one try may take, connect to answer
CONCURRENCY = 32  # tries under way at once, per API server
POLL = 0.5  # seconds between looks for due deliveries when none was found
MAX_RESULT = 64 * 1024  # a JSON result up to this size travels in the payload; larger ones by result_url
TOLERANCE = 300.0  # verify_webhook: seconds a timestamp may be off, either way
SECRET_PREFIX = "whsec_"


def parse_secret(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (the prefix may be left out)."""
    encoded = secret[len(SECRET_PREFIX) :] if secret.startswith(SECRET_PREFIX) else secret
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) < 16:
        raise ValueError(
            "A webhook secret is whsec_ followed by at least 16 random bytes in base64; make one with: "
            "python -c \"import base64, os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
        )
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify_webhook(
    secret: str, headers: Mapping[str, str], body: bytes | str, *, tolerance: float = TOLERANCE
) -> dict[str, Any]:
    """Check that a webhook request came from a taskserve server holding ``secret``; return its payload.

    Args:
        secret: the ``whsec_…`` secret the server was started with (``--webhook-secret``).
        headers: the request's headers (any mapping; names in any case).
        body: the request's body exactly as received, before any JSON parsing.
        tolerance: seconds ``webhook-timestamp`` may be from now, either way; an older request
            is refused, so a captured one cannot be replayed later.

    Returns:
        The payload: ``{"type": "task.completed", "task_id", "route", "status", "completed_at",
        "error", "result", "result_url"}``.

    Raises:
        WebhookVerificationError: a header is missing, no signature matches, or the timestamp is
            outside the tolerance. Answer such a request 400 and do not act on it.

    Example:
        >>> payload = taskserve.verify_webhook(SECRET, request.headers, await request.body())
        >>> if payload["status"] == "success": ...
    """
    raw = body.encode() if isinstance(body, str) else bytes(body)
    found = {k.lower(): v for k, v in headers.items()}
    missing = [h for h in ("webhook-id", "webhook-timestamp", "webhook-signature") if not found.get(h)]
    if missing:
        raise WebhookVerificationError(f"The webhook request lacks the header(s) {', '.join(missing)}; it is unsigned.")
    try:
        timestamp = int(found["webhook-timestamp"])
    except ValueError:
        raise WebhookVerificationError(
            f"webhook-timestamp must be whole seconds since the epoch; got {found['webhook-timestamp'][:40]!r}."
        ) from None
    off = time.time() - timestamp
    if abs(off) > tolerance:
        raise WebhookVerificationError(
            f"The webhook's timestamp is {abs(off):.0f}s in the {'past' if off > 0 else 'future'}, more than the "
            f"{tolerance:g}s allowed: a replayed request, or a clock that is off."
        )
    expected = sign(parse_secret(secret), found["webhook-id"], timestamp, raw).encode()
    # Several signatures may be sent (while a secret is rotated), space-separated: any may match.
    if not any(hmac.compare_digest(expected, given.encode()) for given in found["webhook-signature"].split()):
        raise WebhookVerificationError(
            "No webhook-signature matches: the request was signed with another secret, or its body was changed."
        )
    try:
        parsed: dict[str, Any] = json.loads(raw)
    except ValueError:
        raise WebhookVerificationError("The webhook's body is not JSON, though its signature matches.") from None
    return parsed


def message_id(task_id: str) -> str:
    return f"msg_{task_id}"


def result_url(record: TaskRecord, public_url: str | None) -> str:
    path = f"{record.route}/get?task_id={quote(record.id, safe='')}"
    return public_url.rstrip("/") + path if public_url else path


def payload(record: TaskRecord, result: Result | None, public_url: str | None = None) -> bytes:
    """The body POSTed for an ended task; a result that is not JSON, or too large, is left to ``result_url``."""
    value = None
    if result is not None and result.content_type == "application/json" and len(result.body) <= MAX_RESULT:
        value = json.loads(result.body)
    body = {
        "type": "task.completed",
        "task_id": record.id,
        "route": record.route,
        "status": record.status.value,
        "completed_at": iso(record.completed_at),
        "error": record.error,
        "result": value,
        "result_url": result_url(record, public_url),
    }
    return json.dumps(body, separators=(",", ":")).encode()


def retry_delay(attempt: int, first: float) -> float:
    """Seconds after try ``attempt`` fails before the next, give or take 10 % (retries spread out)."""
    return first * BACKOFF ** (attempt - 1) * random.uniform(0.9, 1.1)


class Deliverer:
    """Sends the due webhook deliveries of the store, a few at a time, for as long as it runs.

    Every API server runs one; they share the work through the store's leases.

    Args:
        queue: the store holding the deliveries.
        secret: the ``whsec_…`` signing secret; without one, requests go unsigned.
        tries: tries in all, the first one included, before a delivery is ``failed``.
        retry_delay: seconds before the first retry; each next one waits ``BACKOFF`` times longer.
        timeout: seconds one try may take.
        public_url: this server's base URL as clients reach it, for an absolute ``result_url``.
        on_try: called with ``"delivered"``, ``"retry"`` or ``"failed"`` after each try (metrics).
    """

    def __init__(
        self,
        queue: Queue,
        *,
        secret: str | None = None,
        tries: int = DEFAULT_TRIES,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        timeout: float = DEFAULT_TIMEOUT,
        concurrency: int = CONCURRENCY,
        public_url: str | None = None,
        on_try: Callable[[str], None] | None = None,
    ) -> None:
        self.queue = queue
        self.key = None if secret is None else parse_secret(secret)
        self.tries = max(1, tries)
        self.retry_delay = retry_delay
        self.timeout = timeout
        self.concurrency = concurrency
        # A try outlives its lease only if the process hangs; then another server tries again.
        self.lease = timeout + 20.0
        self.public_url = public_url
        self.on_try = on_try

    async def run(self) -> None:
        inflight: set[asyncio.Task[None]] = set()
        unavailable = False
        headers = {"user-agent": f"taskserve/{__version__}", "content-type": "application/json"}
        # A connection kept per slot: most deliveries go to a few receivers, and a new TLS
        # handshake per try would cost more than the try.
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(
            timeout=self.timeout, headers=headers, follow_redirects=False, limits=limits
        ) as client:
            try:
                while True:
                    free = self.concurrency - len(inflight)
                    taken: list[tuple[str, int]] = []
                    try:
                        taken = await self.queue.take_webhooks(free, self.lease, self.tries)
                        unavailable = False
                    except QueueUnavailable as exc:
                        if not unavailable:  # once per outage, not twice a second
                            logger.warning("webhook deliveries wait for the broker: %s", exc)
                        unavailable = True
                    except Exception:  # a bug must not end deliveries for the life of the process
                        logger.exception("taking due webhook deliveries failed; looking again shortly")
                    for task_id, attempt in taken:
                        task = asyncio.create_task(self._deliver(client, task_id, attempt))
                        inflight.add(task)
                        task.add_done_callback(inflight.discard)
                    if inflight and len(taken) == free:  # every slot busy, and more may be due
                        await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                    else:
                        await asyncio.sleep(POLL)
            finally:
                # A try cut short here is made again once its lease lapses, by whichever server.
                for task in inflight:
                    task.cancel()
                await asyncio.gather(*inflight, return_exceptions=True)

    async def _deliver(self, client: httpx.AsyncClient, task_id: str, attempt: int) -> None:
        try:
            record = await self.queue.get(task_id)
            if record.webhook is None:
                return
            result = await self.queue.get_result(task_id) if record.status is TaskStatus.SUCCESS else None
            error = await self._send(client, record, payload(record, result, self.public_url))
            retry_in = None if error is None or attempt >= self.tries else retry_delay(attempt, self.retry_delay)
            if not await self.queue.webhook_result(task_id, attempt, error, retry_in):
                return  # another server took it meanwhile (this one was too slow): its report counts
        except TaskNotFound:
            return  # purged by retention meanwhile: nothing left to tell
        except QueueUnavailable as exc:
            logger.warning("webhook of task %s: %s; it is tried again once its lease lapses", task_id, exc)
            return
        except Exception:
            logger.exception("webhook of task %s: the try broke; it is tried again once its lease lapses", task_id)
            return
        outcome = "delivered" if error is None else "retry" if retry_in is not None else "failed"
        if outcome == "failed":
            logger.warning("webhook of task %s failed after %d tries: %s", task_id, attempt, error)
        if self.on_try is not None:
            self.on_try(outcome)

    async def _send(self, client: httpx.AsyncClient, record: TaskRecord, body: bytes) -> str | None:
        """One try; returns what went wrong, or None on a 2xx answer."""
        assert record.webhook is not None
        msg_id, timestamp = message_id(record.id), int(time.time())
        headers = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
        if self.key is not None:
            headers["webhook-signature"] = sign(self.key, msg_id, timestamp, body)
        try:
            async with client.stream("POST", record.webhook, content=body, headers=headers) as response:
                if 200 <= response.status_code < 300:
                    return None
                text = b""
                async for chunk in response.aiter_bytes():
                    text += chunk
                    if len(text) >= 200:
                        break
                said = text[:200].decode(errors="replace").strip()
                return f"HTTP {response.status_code}" + (f": {said}" if said else "")
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:500] if str(exc) else type(exc).__name__
