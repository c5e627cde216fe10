"""Options of one submission, from the query string: ``?priority=5&delay=10&tag=team:search``.

They apply to ``POST /{route}/submit``, to every item of ``/{route}/submit_many`` and to the
direct call ``POST /{route}``, and override the decorator's values for that task only. Two
also come as headers, as other APIs taught clients to send them: ``Cancel-After: SECONDS``
(a deadline) and ``Idempotency-Key: KEY``. A value that cannot be used, or a parameter that
is no option, is refused with 422 naming it (in ``detail``, ``loc`` is ``["query", name]`` or
``["header", name]``) before anything is queued: a typo must not quietly queue a task
without the option the caller meant.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from urllib.parse import urlsplit

from starlette.requests import Request

from .._types import NewTask
from ..exceptions import ValidationFailed

NAMES = ("priority", "delay", "run_at", "ttl", "timeout", "deadline", "idempotency_key", "webhook", "tag")
HEADERS = {b"cancel-after": "Cancel-After", b"idempotency-key": "Idempotency-Key"}
MAX_KEY = 255
MAX_URL = 2048
MAX_DELAY = 366 * 24 * 3600.0  # a year: further ahead is a typo, or work for a scheduler
MAX_TIMEOUT = 7 * 24 * 3600.0
PRIORITY_RANGE = (-1_000_000, 1_000_000)
MAX_TAGS = 32
TAG_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
MAX_TAG_VALUE = 256
# The rules above as the OpenAPI document states them (JSON Schema patterns), read by the server too.
TAG_PATTERN = rf"^[A-Za-z0-9_.\-]{{1,64}}:[\s\S]{{0,{MAX_TAG_VALUE}}}$"
# A port is 0 to 65535: a larger one passed the check, then failed every delivery try.
PORT_PATTERN = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
WEBHOOK_PATTERN = rf"^https?://[A-Za-z0-9._~\-]+(:{PORT_PATTERN})?([/?#][\x21-\x7e]*)?$"
_WEBHOOK = re.compile(WEBHOOK_PATTERN)

Bad = Callable[..., None]  # read_options's ``bad(name, message, kind="value_error")``


@dataclass(frozen=True)
class SubmitOptions:
    priority: int | None = None
    run_at: float | None = None  # seconds since the epoch; from delay or run_at
    ttl: float | None = None
    timeout: float | None = None
    deadline: float | None = None  # seconds since the epoch; from deadline or Cancel-After
    idempotency_key: str | None = None
    webhook: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def apply(self, task: NewTask, item: int | None = None) -> NewTask:
        """``task`` (made with the decorator's values) with these options over them.

        ``item`` is the task's index in a ``submit_many``: one idempotency key covers the whole
        request, so each item is keyed ``KEY#i`` and a repeated request finds every one again.
        """
        if self is NO_OPTIONS:
            return task
        key = self.idempotency_key
        if key is not None and item is not None:
            key = f"{key}#{item}"
        return replace(
            task,
            priority=task.priority if self.priority is None else self.priority,
            run_at=self.run_at,
            ttl=task.ttl if self.ttl is None else self.ttl,
            timeout=task.timeout if self.timeout is None else self.timeout,
            deadline=self.deadline,
            idempotency_key=key,
            webhook=self.webhook,
            tags=dict(self.tags),
        )


NO_OPTIONS = SubmitOptions()


def read_options(request: Request) -> SubmitOptions:
    """The submission's options; ``ValidationFailed`` (422) naming each bad one."""
    headers = {HEADERS[k]: v.decode("latin-1") for k, v in request.scope["headers"] if k in HEADERS}
    if not request.scope.get("query_string") and not headers:
        return NO_OPTIONS
    params = request.query_params
    problems: list[tuple[str, str, str]] = []  # (name, message, type)
    where: dict[str, str] = {}  # the loc's first part where it is not "query"

    def bad(name: str, message: str, kind: str = "value_error") -> None:
        problems.append((name, message, kind))

    for name in sorted(set(params.keys()) - set(NAMES)):
        bad(name, f"{name!r} is not a submit option; the options are {', '.join(NAMES)}.", "extra_forbidden")
    for name in NAMES[:-1]:
        if len(params.getlist(name)) > 1:
            bad(name, f"{name} is given more than once.")
    priority = _number(params.get("priority"), "priority", bad, integer=True)
    if priority is not None and not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]:
        bad("priority", f"priority must be between {PRIORITY_RANGE[0]:,} and {PRIORITY_RANGE[1]:,}; got {priority}.")
    delay = _number(params.get("delay"), "delay", bad)
    if delay is not None and not 0 <= delay <= MAX_DELAY:
        bad("delay", f"delay is seconds from now, 0 to {MAX_DELAY:.0f} (a year); got {delay:g}.")
    run_at = _instant(params.get("run_at"), "run_at", bad)
    ttl = _number(params.get("ttl"), "ttl", bad)
    if ttl is not None and not 0 < ttl <= MAX_DELAY:
        bad("ttl", f"ttl is seconds above 0, at most {MAX_DELAY:.0f} (a year); got {ttl:g}.")
    timeout = _number(params.get("timeout"), "timeout", bad)
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
        bad("timeout", f"timeout is seconds above 0, at most {MAX_TIMEOUT:.0f} (a week); got {timeout:g}.")
    deadline = _deadline(params.get("deadline"), headers.get("Cancel-After"), bad, where)
    key = _key(params.get("idempotency_key"), headers.get("Idempotency-Key"), bad, where)
    webhook = _webhook(params.get("webhook"), bad, getattr(request.app.state, "webhook_allow", None))
    tags = _tags(params.getlist("tag"), bad)
    # Each is a "not before": given both, both hold (and the deadline below, a "not after", likewise).
    starts = [t for t in (None if delay is None else time.time() + delay, run_at) if t is not None]
    when = max(starts) if starts else None
    if problems:
        message = "Invalid submit options: " + " ".join(msg for _, msg, _ in problems)
        detail = [{"loc": [where.get(n, "query"), n], "msg": m, "type": k} for n, m, k in problems]
        raise ValidationFailed(message, detail)
    return SubmitOptions(
        priority=int(priority) if priority is not None else None,
        run_at=when,
        ttl=ttl,
        timeout=timeout,
        deadline=deadline,
        idempotency_key=key,
        webhook=webhook,
        tags=tags,
    )


def _deadline(raw: str | None, header: str | None, bad: Bad, where: dict[str, str]) -> float | None:
    ts = _instant(raw, "deadline", bad)  # one already passed ends the task at once (DeadlineExceeded)
    if header is not None:
        where["Cancel-After"] = "header"
        seconds = _number(header.strip(), "Cancel-After", bad)
        if seconds is not None and not 0 < seconds <= MAX_TIMEOUT:
            bad("Cancel-After", f"Cancel-After is seconds above 0, at most {MAX_TIMEOUT:.0f} (a week); got {header!r}.")
            return None
        if seconds is not None:
            ts = time.time() + seconds if ts is None else min(ts, time.time() + seconds)  # both: the earlier
    return ts


def _key(raw: str | None, header: str | None, bad: Bad, where: dict[str, str]) -> str | None:
    name = "idempotency_key"
    if header is not None:
        if raw is not None and raw != header:
            bad(name, "The idempotency_key option and the Idempotency-Key header differ; give one.")
            return None
        if raw is None:
            raw, name = header, "Idempotency-Key"
            where[name] = "header"
    if raw is None:
        return None
    if not 0 < len(raw) <= MAX_KEY or not raw.isprintable() or not raw.isascii():
        bad(name, f"{name} must be 1 to {MAX_KEY} printable ASCII characters (a UUID does); got {raw[:40]!r}.")
        return None
    return raw


def _webhook(raw: str | None, bad: Bad, allow: frozenset[str] | None) -> str | None:
    if raw is None:
        return None
    if not _WEBHOOK.fullmatch(raw) or len(raw) > MAX_URL:
        bad(
            "webhook",
            f"webhook must be an http:// or https:// URL of at most {MAX_URL} characters (a host, a port up to "
            f"65535, no user); got {raw[:80]!r}.",
        )
        return None
    parsed = urlsplit(raw)
    assert parsed.hostname is not None  # the pattern requires one
    if allow is not None and parsed.hostname.lower() not in allow:
        # The operator's --webhook-allow: the server must not be made to POST to just any host.
        bad(
            "webhook",
            f"webhook host {parsed.hostname!r} is not allowed on this server; allowed: {', '.join(sorted(allow))}.",
        )
        return None
    return raw


def _number(raw: str | None, name: str, bad: Bad, *, integer: bool = False) -> float | None:
    if raw is None:
        return None
    try:
        value = float(int(raw)) if integer else float(raw)
    except ValueError:
        bad(name, f"{name} must be {'an integer' if integer else 'a number'}; got {raw[:40]!r}.", "type_error")
        return None
    if not math.isfinite(value):
        bad(name, f"{name} must be a finite number; got {raw[:40]!r}.")
        return None
    return value


def _instant(raw: str | None, name: str, bad: Bad) -> float | None:
    if raw is None:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        bad(name, f"{name} must be an ISO 8601 time such as 2026-12-01T09:00:00Z; got {raw[:40]!r}.", "type_error")
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)  # documented: a time without offset is UTC
    # Any time an ISO 8601 string can name (as /docs.json says): a run_at in the past means "now".
    return moment.timestamp()


def _tags(raw: list[str], bad: Bad) -> dict[str, str]:
    tags: dict[str, str] = {}
    if len(raw) > MAX_TAGS:
        bad("tag", f"At most {MAX_TAGS} tags per task; got {len(raw)}.")
        return tags
    for item in raw:
        key, sep, value = item.partition(":")
        if not sep or not TAG_KEY.fullmatch(key) or len(value) > MAX_TAG_VALUE:
            bad(
                "tag",
                f"A tag is KEY:VALUE, the key 1-64 letters, digits or _.- and the value at most "
                f"{MAX_TAG_VALUE} characters; got {item[:80]!r}.",
            )
        elif key in tags:
            bad("tag", f"Tag {key!r} is given twice.")
        else:
            tags[key] = value
    return tags
