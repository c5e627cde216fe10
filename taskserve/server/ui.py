"""``GET /ui``: the dashboard, three static files shipped inside the package and served from memory.

The page is plain HTML, CSS and JavaScript (no framework, no build step, nothing fetched from
a CDN), so it works on a machine without internet and installs with the wheel. It reads the
same JSON API as any client (``/queues``, ``/workers``, ``/tasks``, ...). No script or style
is inline, which lets every dashboard response carry a strict Content-Security-Policy: task
data shown on the page is untrusted, and the policy is the second wall behind the page's
own rule of writing it only as text.

The page and its files answer without an API key: the page asks for the key itself (kept in
the browser's ``sessionStorage``) when the API answers 401.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

PREFIX = "/ui"
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "font-src 'none'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidated on every load (cheap: an ETag), so an upgraded server never runs an old script.
    "Cache-Control": "no-cache",
}


def is_public(path: str) -> bool:
    """The dashboard's own paths, which access control lets through: the page asks for the key."""
    return path == PREFIX or path.startswith(PREFIX + "/")


class Dashboard:
    def __init__(self) -> None:
        root = resources.files("taskserve") / "ui"
        self.files: dict[str, tuple[bytes, str, str]] = {}
        for name, media_type in FILES.items():
            body = (root / name).read_bytes()
            self.files[name] = (body, media_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')

    def routes(self) -> list[Route]:
        return [
            Route(PREFIX, self.page, methods=["GET", "HEAD"]),
            # /ui/ would resolve the page's relative links one level too deep.
            Route(PREFIX + "/", self.to_page, methods=["GET", "HEAD"]),
            *(Route(f"{PREFIX}/{name}", self.asset, methods=["GET", "HEAD"]) for name in FILES if name != "index.html"),
        ]

    async def page(self, request: Request) -> Response:
        return self._serve("index.html", request)

    async def to_page(self, request: Request) -> Response:
        return RedirectResponse("../ui", status_code=308)

    async def asset(self, request: Request) -> Response:
        return self._serve(request.url.path.rsplit("/", 1)[-1], request)

    def _serve(self, name: str, request: Request) -> Response:
        body, media_type, etag = self.files[name]
        headers = {**HEADERS, "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)
