"""API keys (SPEC §10): who may call the server, and whose tasks each caller sees.

A key is a secret, or ``name=secret``. Its *owner* names the tasks it submits: the name, or for
an unnamed key ``key-`` and the first 12 hex digits of the secret's SHA-256, so neither the
store nor a log ever holds a secret. A request names its key in ``Authorization: Bearer KEY``
or ``X-API-Key: KEY``; ``AuthMiddleware`` answers 401 without one (or with a wrong one), and
puts the ``Caller`` on the request scope for the routes to read with ``owner_filter``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("taskserve.server")

SCOPE_KEY = "taskserve.caller"
# Reachable without a key: probes, and the dashboard's page and static files (it asks for a key).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/ui"})
OPEN_PREFIXES = ("/ui/",)
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_UNAUTHORIZED = (
    b'{"error":"This server needs an API key: send it as the header Authorization: Bearer KEY (or X-API-Key: KEY)."}'
)
_WRONG_KEY = b'{"error":"The API key sent is not one this server accepts; check it, or ask its operator for one."}'
_NOT_BEARER = (
    b'{"error":"The Authorization header holds no API key this server can read: write Bearer, one space'
    b' and the key (Authorization: Bearer KEY), or send the key alone as X-API-Key: KEY."}'
)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the owner of its key, and whether that key is an admin key."""

    owner: str
    admin: bool = False


def parse_key(text: str) -> tuple[str, str]:
    """``(owner, secret)`` of a key given as ``secret`` or ``name=secret``.

    Text before the first ``=`` counts as a name only if it looks like one (letters, digits,
    ``_.@-``) and a secret follows that does not begin with ``=``: a base64 secret ending in
    ``==`` stays one unnamed key.
    """
    text = text.strip()
    name, sep, secret = text.partition("=")
    if sep and secret and not secret.startswith("=") and _NAME.fullmatch(name):
        return name, secret
    if not text:
        raise ValueError("An API key is empty; give a secret, or name=secret.")
    return "key-" + hashlib.sha256(text.encode()).hexdigest()[:12], text


def read_keys_file(path: str) -> list[str]:
    """The keys of a file: one ``name=secret`` (or secret) a line; blank lines and ``#`` comments skipped.

    Read as ``utf-8-sig``: a byte order mark (Windows editors write one) would otherwise become
    part of the first key's name, and that key would silently stop working.
    """
    with open(path, encoding="utf-8-sig") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


class Keys:
    """The keys a server accepts, as ``(secret, Caller)`` pairs, and where more come from.

    Args:
        keys: ``secret`` or ``name=secret`` each; their callers see their own tasks.
        admin: the same, for keys that see and manage every task.
        path: a file of keys (``read_keys_file``), read now and again on ``reload()`` (SIGHUP).

    Example:
        >>> keys = Keys(["alice=s3cret"], admin=["ops=r00t"])
        >>> keys.lookup("s3cret")
        Caller(owner='alice', admin=False)
    """

    def __init__(self, keys: Iterable[str] = (), admin: Iterable[str] = (), path: str | None = None) -> None:
        self.keys = list(keys)
        self.admin = list(admin)
        self.path = path
        self.entries: list[tuple[bytes, Caller]] = []
        self.entries = self._build(read_keys_file(path) if path else [])

    def _build(self, from_file: Sequence[str]) -> list[tuple[bytes, Caller]]:
        entries: dict[bytes, Caller] = {}
        for text in [*self.keys, *from_file]:
            owner, secret = parse_key(text)
            earlier = entries.setdefault(secret.encode(), Caller(owner))
            if earlier.owner != owner:  # they would act as one owner, seeing each other's tasks
                raise ValueError(f"The keys of {earlier.owner} and {owner} have the same secret; give each its own.")
        for text in self.admin:  # a secret given as both is an admin key
            owner, secret = parse_key(text)
            entries[secret.encode()] = Caller(owner, admin=True)
        return list(entries.items())

    @property
    def enabled(self) -> bool:
        """Whether requests need a key: some key is configured, or a keys file is watched."""
        return bool(self.entries) or self.path is not None

    def lookup(self, presented: str | bytes) -> Caller | None:
        """The caller a key belongs to, ``None`` for an unknown key.

        Every configured key is compared, with ``hmac.compare_digest``, whichever matches: the
        time taken tells nothing of how much of a secret a guess got right, nor which key it hit.
        """
        given = presented.encode() if isinstance(presented, str) else presented
        found = None
        for secret, caller in self.entries:
            if hmac.compare_digest(secret, given):
                found = caller
        return found

    def reload(self) -> bool:
        """Read the keys file again; a file that cannot be read leaves the keys as they were."""
        if self.path is None:
            return False
        try:
            self.entries = self._build(read_keys_file(self.path))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            logger.error("kept the old API keys: cannot read the keys file %s (%s)", self.path, type(exc).__name__)
            return False
        logger.info("API keys reloaded from %s: %d key(s)", self.path, len(self.entries))
        return True

    def owners(self) -> list[str]:
        """The owners of the keys, for logs (never the secrets)."""
        return sorted({c.owner + (" (admin)" if c.admin else "") for _, c in self.entries})


def keys_from_env(keys: Sequence[str], admin: Sequence[str], path: str | None) -> Keys:
    """The keys of the command line, plus ``TASKSERVE_API_KEYS`` and ``TASKSERVE_ADMIN_KEYS`` (comma-separated)."""
    env = [k for k in os.environ.get("TASKSERVE_API_KEYS", "").split(",") if k.strip()]
    env_admin = [k for k in os.environ.get("TASKSERVE_ADMIN_KEYS", "").split(",") if k.strip()]
    return Keys([*keys, *env], [*admin, *env_admin], path)


class AuthMiddleware:
    """Answers 401 to a request without a known key, but on the open paths; else records its ``Caller``.

    One pass over the request's headers and one compare per configured key: this sits in
    front of every status poll.
    """

    def __init__(self, app: ASGIApp, keys: Keys, public_metrics: bool = False, dashboard: bool = True) -> None:
        self.app = app
        self.keys = keys
        self.open, self.prefixes = open_paths(public_metrics, dashboard)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if path in self.open or path.startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        token = None
        other_scheme = False
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, rest = value.strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    token = rest.strip()
                else:  # "KEY" alone, "Basic ...", "Bearer<TAB>KEY": say how, not "needs a key"
                    other_scheme = True
            elif name == b"x-api-key":
                token = value.strip()
        caller = None if token is None else self.keys.lookup(token)
        if caller is None:
            await _unauthorized(
                send, _WRONG_KEY if token is not None else _NOT_BEARER if other_scheme else _UNAUTHORIZED
            )
            return
        scope[SCOPE_KEY] = caller
        await self.app(scope, receive, send)


def open_paths(public_metrics: bool = False, dashboard: bool = True) -> tuple[frozenset[str], tuple[str, ...]]:
    """The paths (and path prefixes) answered without a key.

    The dashboard's only while it is served: an endpoint of the service at ``/ui`` turns it
    off, and its routes (``/ui/...``) are then the endpoint's, which need a key as any other.
    """
    paths = OPEN_PATHS if dashboard else PROBE_PATHS
    return (paths | {"/metrics"} if public_metrics else paths), (OPEN_PREFIXES if dashboard else ())


async def _unauthorized(send: Send, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def caller(request: Request) -> Caller | None:
    """The request's caller; ``None`` on a server without keys."""
    found: Caller | None = request.scope.get(SCOPE_KEY)
    return found


def owner_filter(request: Request) -> str | None:
    """The owner whose tasks this caller may see: its own, or ``None`` (all) for an admin or a server without keys."""
    found: Caller | None = request.scope.get(SCOPE_KEY)
    return None if found is None or found.admin else found.owner


def submitter(request: Request) -> str | None:
    """The owner a task submitted by this request belongs to (``None`` on a server without keys)."""
    found: Caller | None = request.scope.get(SCOPE_KEY)
    return None if found is None else found.owner


def secure_document(document: dict[str, Any], public_metrics: bool = False, dashboard: bool = True) -> dict[str, Any]:
    """The OpenAPI document of a server with keys: both ways to send one, and the 401 of each operation."""
    unlocked, prefixes = open_paths(public_metrics, dashboard)
    schemes = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    unauthorized = {
        "description": "No API key, or one the server does not accept (with WWW-Authenticate: Bearer).",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    paths: dict[str, Any] = {}
    for path, operations in document["paths"].items():
        paths[path] = {}
        for method, op in operations.items():
            if path in unlocked or path.startswith(prefixes):
                paths[path][method] = {**op, "security": []}
            else:
                paths[path][method] = {**op, "responses": {**op["responses"], "401": unauthorized}}
    components = {**document["components"], "securitySchemes": schemes}
    return {**document, "paths": paths, "components": components, "security": [{"bearer": []}, {"apiKey": []}]}
