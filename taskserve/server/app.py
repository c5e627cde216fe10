"""The HTTP routes: one set per endpoint (submit, status, get, wait, cancel, retry, call) and the service-wide ones."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio.to_thread
import pydantic_core
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from .._aio import cancel_and_wait
from .._splice import close_all
from .._types import Args, NewTask, TaskRecord, TaskStatus
from .._wire import InputLimits
from ..exceptions import InvalidTransition, QueueUnavailable, ValidationFailed
from ..queue.base import Queue
from ..service import Endpoint, Service
from ..tracing import submit_span
from ..webhooks import DEFAULT_RETRY_DELAY, DEFAULT_TRIES, Deliverer
from . import bulk, events, openapi, tasks, ui
from ._errors import EXCEPTION_HANDLERS
from .auth import AuthMiddleware, Keys, owner_filter, secure_document, submitter
from .backpressure import DrainRate
from .bentoml_wire import STREAM_CALL, BentoWire, WireMode, streamed
from .diskspace import DEFAULT_MIN_FREE, DiskCheck
from .inputs import DEFAULT_BODY_TIMEOUT, read_arguments, read_json, read_many
from .metrics import Metrics
from .openapi import DEFAULT_CALL_TIMEOUT, call_limit
from .options import NO_OPTIONS, SubmitOptions, read_options
from .surface import App, result_headers
from .workers import WorkerView

logger = logging.getLogger("taskserve.server")

DEFAULT_MAX_BODY = 100 * 1024 * 1024
MAX_WAIT = 300.0
NO_WORKER_GRACE = 5.0  # a direct call waits this long for a worker to appear before it answers 503
CLOSE_TIMEOUT = 5.0  # seconds closing the broker connection may take at shutdown

Handler = Callable[[Request], Awaitable[Response]]


def task_id_param(request: Request) -> str:
    raw: bytes = request.scope.get("query_string", b"")
    task_id: str | None
    if raw.startswith(b"task_id=") and not any(c in raw for c in b"&%+;"):
        # The common ?task_id=ID, plain: read as is (full query parsing cost a poll ~15 µs).
        task_id = raw[8:].decode("latin-1")
    else:
        task_id = request.query_params.get("task_id")
    if not task_id:
        raise HTTPException(400, "Missing the task_id query parameter, as in ?task_id=ID.")
    return task_id


class EndpointRoutes:
    """The handlers of one endpoint."""

    def __init__(
        self,
        endpoint: Endpoint,
        queue: Queue,
        metrics: Metrics,
        max_body: int,
        workers: WorkerView,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        max_queue: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        # The endpoint's own bound, else the server's --max-queue.
        self.max_queue = endpoint.max_queue if endpoint.max_queue is not None else max_queue
        self.workers = workers
        self.call_timeout = call_timeout
        self.route = endpoint.route
        self.codec = endpoint.codec
        self.queue = queue
        self.metrics = metrics
        self.max_body = max_body

    def routes(self) -> list[Route]:
        r = self.route
        direct = Route(r, self.call, methods=["POST"])
        if not self.endpoint.is_task:
            return [direct]
        return [
            Route(f"{r}/submit", self.submit, methods=["POST"]),
            Route(f"{r}/submit_many", self.submit_many, methods=["POST"]),
            Route(f"{r}/wait_many", functools.partial(bulk.wait_many, self), methods=["POST"]),
            Route(f"{r}/status", self.status, methods=["GET"]),
            Route(f"{r}/get", self.get, methods=["GET"]),
            Route(f"{r}/wait", self.wait, methods=["GET"]),
            Route(f"{r}/events", functools.partial(events.events, self), methods=["GET"]),
            Route(f"{r}/preview", self.preview, methods=["GET"]),
            Route(f"{r}/retry", self.retry, methods=["POST", "PUT"]),
            Route(f"{r}/cancel", self.cancel, methods=["POST", "PUT"]),
            direct,
        ]

    # -- input -----------------------------------------------------------------------------

    async def arguments(self, request: Request) -> Args:
        return await read_arguments(request, self.codec, request.app.state.limits, self.max_body)

    def new_task(
        self,
        args: Args,
        options: SubmitOptions = NO_OPTIONS,
        item: int | None = None,
        trace: str | None = None,
        owner: str | None = None,
    ) -> NewTask:
        ep = self.endpoint
        task = NewTask(
            self.route,
            args,
            max_attempts=ep.max_attempts,
            timeout=ep.timeout,
            priority=ep.priority,
            ttl=ep.ttl,
            max_queue=self.max_queue,
            trace=trace,
            owner=owner,
        )
        return options.apply(task, item)

    # -- handlers --------------------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        started = time.perf_counter()
        options = read_options(request)
        args = await self.arguments(request)
        with submit_span(self.endpoint.name, request.headers) as trace:
            record = await self.queue.enqueue(self.new_task(args, options, trace=trace, owner=submitter(request)))
        if record.replayed:
            return _replayed(record)
        self.metrics.submitted.labels(self.endpoint.name).inc()
        self.metrics.latency.labels(self.endpoint.name).observe(time.perf_counter() - started)
        return JSONResponse({"task_id": record.id, "status": record.status.value})

    async def submit_many(self, request: Request) -> Response:
        options = read_options(request)
        args = await read_many(request, self.codec, request.app.state.limits, self.max_body)
        keyed = options.idempotency_key is not None
        with submit_span(self.endpoint.name, request.headers) as trace:
            owner = submitter(request)
            tasks = [self.new_task(a, options, i if keyed else None, trace, owner) for i, a in enumerate(args)]
            records = await self.queue.enqueue_many(tasks)
        self.metrics.submitted.labels(self.endpoint.name).inc(sum(1 for r in records if not r.replayed))
        body = {"tasks": [{"task_id": r.id, "status": r.status.value} for r in records]}
        replayed = {"Idempotent-Replayed": "true"} if records and all(r.replayed for r in records) else None
        return JSONResponse(body, headers=replayed)

    async def status(self, request: Request) -> Response:
        record = await self.queue.get(task_id_param(request), self.route, owner_filter(request))
        return JSONResponse(await self.status_json(record))

    async def status_json(self, record: TaskRecord) -> dict[str, Any]:
        """The status; a pending task also says its place in the queue and how many live workers
        serve its route, and warns at none."""
        if record.status is TaskStatus.PENDING:
            with contextlib.suppress(QueueUnavailable):
                record.position = await self.queue.position(record)
        body = record.to_json()
        if record.status is TaskStatus.PENDING:
            with contextlib.suppress(QueueUnavailable):
                body["workers"] = n = await self.workers.serving(self.route)
                if n == 0:
                    body["warning"] = self.workers.no_worker_message(self.route)
        return body

    async def get(self, request: Request) -> Response:
        record = await self.queue.get(task_id_param(request), self.route, owner_filter(request))
        return await self.result_response(record)

    async def result_response(self, record: TaskRecord, *, failure_code: int = 409) -> Response:
        if record.status is TaskStatus.SUCCESS:
            result = await self.queue.get_result(record.id)
            if result is not None:
                media_type, headers = result_headers(result, self.codec.output_kind, record.id)
                return Response(result.body, media_type=media_type, headers=headers)
        reason = {
            TaskStatus.PENDING: "is still pending; poll its status or wait",
            TaskStatus.IN_PROGRESS: "is still in progress; poll its status or wait",
            TaskStatus.FAILURE: f"failed: {record.error}",
            TaskStatus.CANCELLED: "was cancelled",
            TaskStatus.SUCCESS: "has no stored result (it expired)",
        }[record.status]
        code = failure_code if record.status is TaskStatus.FAILURE else 409
        return JSONResponse(
            {
                "error": f"Task {record.id!r} {reason}.",
                "status": record.status.value,
                "task_id": record.id,
                "task_error": record.error,
            },
            status_code=code,
        )

    async def wait(self, request: Request) -> Response:
        task_id = task_id_param(request)
        raw = request.query_params.get("timeout", "30")
        try:
            timeout = float(raw)
            if not 0 <= timeout < float("inf"):
                raise ValueError
        except ValueError:
            raise HTTPException(400, f"timeout must be a number of seconds, got {raw!r}.") from None
        record = await self.queue.wait(task_id, min(timeout, MAX_WAIT), self.route, owner_filter(request))
        return JSONResponse(await self.status_json(record))

    async def preview(self, request: Request) -> Response:
        """The latest preview image the task reported with ``taskserve.progress(..., preview=image)``."""
        record = await self.queue.get(task_id_param(request), self.route, owner_filter(request))
        image = await self.queue.preview(record.id)
        if image is None:
            raise HTTPException(404, f"Task {record.id!r} has reported no preview (yet); its status says its progress.")
        return Response(image.body, media_type=image.content_type, headers={"Cache-Control": "no-cache"})

    async def retry(self, request: Request) -> Response:
        """A new task with the arguments of a finished one, and any given in a JSON body over them.

        The merged arguments are validated as a submit's are (422 naming the bad one).
        """
        task_id = task_id_param(request)
        owner = owner_filter(request)
        overrides = await read_json(request, dict, self.max_body, request.app.state.limits)
        args = None
        if overrides:
            record = await self.queue.get(task_id, self.route, owner)
            stored = pydantic_core.from_json(await self.queue.original_args(record.id))
            merged = {**stored, **overrides}
            args = await anyio.to_thread.run_sync(self.codec.validate, merged, request.app.state.limits)
        try:
            record = await self.queue.retry(
                task_id, self.route, args, max_queue=self.max_queue, ttl=self.endpoint.ttl, owner=owner
            )
        finally:
            close_all([args])  # the enqueue closes them, but a retry refused before it (still running) does not
        self.metrics.submitted.labels(self.endpoint.name).inc()
        return JSONResponse({"task_id": record.id, "status": record.status.value, "retry_of": record.retry_of})

    async def cancel(self, request: Request) -> Response:
        record = await self.queue.cancel(task_id_param(request), self.route, owner_filter(request))
        return JSONResponse({"task_id": record.id, "status": record.status.value})

    async def call(self, request: Request) -> Response:
        """Submit, wait for the end, answer with the result; a caller who hangs up cancels it.

        The wait is bounded by ``call_timeout`` (or the endpoint's timeout plus 30 s), answered 504,
        and by the absence of any worker for the route, answered 503 after a short grace so
        that a worker still starting up is waited for. Either way the task is cancelled.
        """
        options = read_options(request)
        limit = call_limit(self.endpoint, self.call_timeout)
        if options.run_at is not None and options.run_at - time.time() > limit:
            raise ValidationFailed(
                f"A direct call waits {limit:g}s for its result, and delay or run_at starts the task later; "
                f"submit it instead (POST {self.route}/submit).",
                [{"loc": ["query", "delay"], "msg": f"later than the call's {limit:g}s", "type": "less_than_equal"}],
            )
        args = await self.arguments(request)
        with submit_span(self.endpoint.name, request.headers) as trace:
            task = self.new_task(args, options, trace=trace, owner=submitter(request))
            record = await self.queue.enqueue(task)
        # A replayed key means another request made this task: waiting on it is fine, cancelling
        # it when this caller gives up is not (the one who made it may still want it).
        owned = not record.replayed
        if owned:
            self.metrics.submitted.labels(self.endpoint.name).inc()
        task_id = record.id
        # Long enough for the task's own time limit (the caller's timeout option included).
        limit = self.call_timeout if task.timeout is None else max(self.call_timeout, task.timeout + 30)
        # Counted from when the task may start: a delayed call waits its delay, then the limit.
        started = time.monotonic() + max(0.0, (task.run_at or 0.0) - time.time())
        unserved_since: float | None = None
        # BentoML's client reads a generator's items as they come (bentoml_wire.streamed).
        streams = self.codec.streams and request.scope.get(STREAM_CALL, False)
        try:
            while not record.status.is_terminal:
                record = await self.queue.wait(task_id, 0.1 if streams else 1.0)
                if record.status.is_terminal:
                    break
                if streams and record.status is TaskStatus.IN_PROGRESS:
                    return streamed(self, request, task_id, owned)
                if await request.is_disconnected():
                    raise asyncio.CancelledError
                now = time.monotonic()
                if now - started > limit:
                    message = f"{self.endpoint.name} did not finish within {limit:g}s."
                    return await self._give_up(task_id, 504, message, owned)
                if record.status is TaskStatus.PENDING and await self.workers.serving(self.route) == 0:
                    unserved_since = unserved_since or now
                    if now - unserved_since >= NO_WORKER_GRACE:
                        return await self._give_up(task_id, 503, self.workers.no_worker_message(self.route), owned)
                else:
                    unserved_since = None
        except asyncio.CancelledError:
            if owned:
                with contextlib.suppress(InvalidTransition, QueueUnavailable, Exception):
                    await self.queue.cancel(task_id)
            raise
        if streams and record.status is TaskStatus.SUCCESS:
            return streamed(self, request, task_id, owned)  # counts it finished once streamed
        self.metrics.finished.labels(self.endpoint.name, record.status.value).inc()
        response = await self.result_response(record, failure_code=409 if _callers_limit(record, options) else 500)
        if not owned:
            response.headers["Idempotent-Replayed"] = "true"
        return response

    async def _give_up(self, task_id: str, code: int, message: str, owned: bool = True) -> Response:
        if owned:
            with contextlib.suppress(InvalidTransition, QueueUnavailable):
                await self.queue.cancel(task_id)
            self.metrics.finished.labels(self.endpoint.name, "cancelled").inc()
        headers = {"Retry-After": "5"} if code == 503 else None
        return JSONResponse({"error": message, "task_id": task_id}, status_code=code, headers=headers)


CORS_METHODS = ["GET", "POST", "PUT"]
CORS_HEADERS = ["Authorization", "X-API-Key", "Content-Type", "Idempotency-Key", "Last-Event-ID"]


class JSONCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, but a refused preflight is answered in JSON, as every other error is.

    Starlette says "Disallowed CORS origin" in plain text; a person debugging a page needs to
    know what the server admits, and a client reading ``error`` must find one.
    """

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        message = (
            f"This CORS preflight is refused (not allowed: {refused}). The server admits pages of the "
            f"origins given with --cors-origin, the methods {', '.join(CORS_METHODS)} and the headers "
            f"{', '.join(CORS_HEADERS)}."
        )
        kept = {k: v for k, v in response.headers.items() if k not in ("content-type", "content-length")}
        return JSONResponse({"error": message}, status_code=400, headers=kept)


def _callers_limit(record: TaskRecord, options: SubmitOptions) -> bool:
    """Whether a failed task was ended by a limit its caller set (a deadline, a ttl, a timeout option):
    the call then answers 409 as ``get`` does, not 500, as nothing went wrong on the server."""
    kind = (record.error or "").partition(":")[0]
    return kind in ("DeadlineExceeded", "Expired") or (kind == "TimeoutError" and options.timeout is not None)


def _replayed(record: TaskRecord) -> Response:
    """The answer to a submit whose idempotency key named an earlier task: that task, marked so."""
    body = {"task_id": record.id, "status": record.status.value}
    return JSONResponse(body, headers={"Idempotent-Replayed": "true"})


class LiteralRouter(Router):
    """Finds a request's route by its path in a dict rather than by trying each route in turn.

    Nearly every taskserve path is literal, and a service of a few endpoints has dozens of
    routes: Starlette's scan (one regular expression per route) cost more per status poll than
    the store's read. Anything not found here (``/tasks/{task_id}``, a 404) goes the usual way.
    """

    def __init__(self, routes: list[Route], **kwargs: Any) -> None:
        super().__init__(routes=routes, **kwargs)
        self.by_path = {route.path: route for route in routes if "{" not in route.path}

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.by_path.get(_route_path(scope)) if scope["type"] == "http" else None
        if route is None:
            await super().app(scope, receive, send)
            return
        scope.setdefault("router", self)
        _, child_scope = route.matches(scope)  # FULL, or PARTIAL for a method it does not take (405)
        scope["route"] = route
        scope.update(child_scope)
        await route.handle(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path below the app's mount point (``root_path``), as the routes are written."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def create_app(
    service: Service,
    queue: Queue,
    *,
    max_body_size: int = DEFAULT_MAX_BODY,
    maintenance: bool = True,
    worker_pids: Callable[[], list[int]] | None = None,
    call_timeout: float = DEFAULT_CALL_TIMEOUT,
    limits: InputLimits | None = None,
    max_queue: int | None = None,
    webhook_secret: str | None = None,
    webhook_allow: list[str] | None = None,
    webhook_tries: int = DEFAULT_TRIES,
    webhook_retry_delay: float = DEFAULT_RETRY_DELAY,
    public_url: str | None = None,
    metrics_dir: str | None = None,
    min_free_disk: int = DEFAULT_MIN_FREE,
    bentoml_wire: WireMode = "auto",
    api_keys: Keys | Sequence[str] | None = None,
    public_metrics: bool = False,
    cors_origins: Sequence[str] = (),
    allowed_hosts: list[str] | None = None,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> Starlette:
    """The ASGI app serving ``service`` over ``queue``.

    Args:
        max_body_size: bytes accepted in one request; more is answered with 413.
        maintenance: run lease recovery and retention purge in this process.
        worker_pids: the live local worker processes, shown by ``/readyz`` (``taskserve serve`` passes it).
        call_timeout: seconds a direct call waits for its result (at least the endpoint's timeout + 30).
        limits: what one request's arguments may hold (image pixels, array sizes, JSON depth).
        max_queue: the most pending tasks a route may hold (429 beyond), for routes without
            their own ``max_queue``.
        webhook_secret: the ``whsec_…`` secret webhooks are signed with (unsigned without one).
        webhook_allow: the only hosts a ``webhook=`` URL may name (any host without).
        webhook_tries: tries of one webhook delivery, the first included, before it is failed.
        webhook_retry_delay: seconds before a webhook's first retry; each next waits 5 times longer.
        public_url: the server's base URL as clients reach it, making webhooks' ``result_url`` absolute.
        metrics_dir: the local workers' ``PROMETHEUS_MULTIPROC_DIR``, whose metrics ``/metrics`` adds.
        min_free_disk: bytes that must be free where the store and workers write, else ``/readyz``
            answers 503 (0: not checked).
        bentoml_wire: who gets BentoML's wire format: ``auto`` (requests of BentoML's clients,
            by their User-Agent), ``always`` or ``never`` (docs/bentoml.md).
        api_keys: the keys callers must send (``secret`` or ``name=secret``, or a ``Keys`` with admin
            keys and a keys file); every route but ``/healthz``, ``/readyz`` and the dashboard then
            answers 401 without one, and each key sees only its own tasks. None: open to all.
        public_metrics: leave ``/metrics`` open to callers without a key (a Prometheus scraper).
        cors_origins: the browser origins allowed to call this server (none by default).
        allowed_hosts: the only ``Host`` names answered (400 for others; ``*.example.com`` for
            subdomains); ``None`` answers any (docs/hardening.md: DNS rebinding).
        body_timeout: seconds a request body may stop arriving before the request gets 408.
    """
    keys = api_keys if isinstance(api_keys, Keys) or api_keys is None else Keys(api_keys)
    metrics = Metrics({ep.route: ep.name for ep in service.endpoints}, metrics_dir)
    # Built now, so that a bad secret stops start-up rather than the first delivery.
    deliverer = Deliverer(
        queue,
        secret=webhook_secret,
        tries=webhook_tries,
        retry_delay=webhook_retry_delay,
        public_url=public_url,
        on_try=lambda outcome: metrics.webhooks.labels(outcome).inc(),
    )
    workers = WorkerView(queue)
    disk = DiskCheck.for_store(queue.local_dirs(), min_free_disk)
    throughput = tasks.Throughput(queue)
    routes: list[Route] = []
    by_route: dict[str, EndpointRoutes] = {}
    for endpoint in service.endpoints:
        by_route[endpoint.route] = handlers = EndpointRoutes(
            endpoint, queue, metrics, max_body_size, workers, call_timeout, max_queue
        )
        routes.extend(handlers.routes())
    schema = openapi.service_schema(service)
    docs = openapi.openapi_document(service, call_timeout)
    dashboard = not any(ui.is_public(ep.route) for ep in service.endpoints)
    if keys is not None and keys.enabled:
        docs = secure_document(docs, public_metrics, dashboard)

    async def schema_json(request: Request) -> Response:
        return JSONResponse(schema)

    async def docs_json(request: Request) -> Response:
        return JSONResponse(docs)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        """Ready when the broker answers, the disk has room and live, ready workers (of any host) serve every route."""
        await queue.ping()  # QueueUnavailable → 503
        short = disk.short()
        if short:
            full = {"status": "disk_full", "error": disk.message(short), "disk": short, "broker": queue.describe()}
            return JSONResponse(full, status_code=503)
        by_route = await workers.ready_by_route([ep.route for ep in service.endpoints])
        missing = [route for route, n in by_route.items() if n == 0]
        body: dict[str, Any] = {"status": "ready", "broker": queue.describe(), "workers": by_route}
        if worker_pids is not None:
            body["worker_pids"] = worker_pids()
        if not missing:
            return JSONResponse(body)
        body["status"] = "no_workers"
        body["error"] = (
            f"No ready worker serves {', '.join(missing)} on the broker {queue.describe()}; "
            "workers may still be starting, or none were started for this broker."
        )
        return JSONResponse(body, status_code=503)

    async def task_status(request: Request) -> Response:
        """The status of any task by id, for callers that do not know (or care about) its route."""
        record = await queue.get(request.path_params["task_id"], owner=owner_filter(request))
        handlers = by_route.get(record.route)  # None: a task of another service on the same broker
        return JSONResponse(record.to_json() if handlers is None else await handlers.status_json(record))

    async def task_arguments(request: Request) -> Response:
        """The arguments a task was submitted with, as stored (the dashboard shows them)."""
        record = await queue.get(request.path_params["task_id"], owner=owner_filter(request))
        return Response(await queue.original_args(record.id), media_type="application/json")

    async def workers_json(request: Request) -> Response:
        return JSONResponse({"workers": [w.to_json() for w in await queue.workers()]})

    async def metrics_text(request: Request) -> Response:
        text = await metrics.render(queue, [ep.route for ep in service.endpoints])
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    routes += [
        Route("/schema.json", schema_json, methods=["GET"]),
        Route("/docs.json", docs_json, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/workers", workers_json, methods=["GET"]),
        Route("/tasks", tasks.list_tasks, methods=["GET"]),
        Route(
            "/queues",
            functools.partial(tasks.queues, service=service, workers=workers, throughput=throughput),
            methods=["GET"],
        ),
        Route("/tasks/{task_id}", task_status, methods=["GET"]),
        Route("/tasks/{task_id}/arguments", task_arguments, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
    ]
    if not dashboard:
        logger.warning("the dashboard is off: an endpoint of the service takes its path, /ui")
    else:
        routes += ui.Dashboard().routes()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await queue.connect()
        except QueueUnavailable as exc:
            # Serve anyway: requests answer 503 until the broker is back, /healthz stays up.
            logger.warning("%s Requests get 503 until it answers.", exc)
        jobs = [asyncio.create_task(throughput.run())]
        if maintenance:
            if webhook_secret is None:
                logger.warning(
                    "webhooks are sent unsigned: receivers cannot tell them from forgeries. "
                    "Give a secret with --webhook-secret or TASKSERVE_WEBHOOK_SECRET (whsec_...)."
                )
            jobs += [asyncio.create_task(_maintain(queue)), asyncio.create_task(deliverer.run())]
        try:
            yield
        finally:
            await cancel_and_wait(jobs)  # _aio: a swallowed cancel held the shutdown for ever
            for job in jobs:
                if not job.cancelled() and job.exception() is not None:
                    logger.error("a background job of the API ended with %r", job.exception())
            try:
                # A broker that went away must not hold the process: the connection is dropped anyway.
                await asyncio.wait_for(queue.close(), CLOSE_TIMEOUT)
            except asyncio.TimeoutError:
                logger.warning("closing the broker connection took over %.0fs; leaving it", CLOSE_TIMEOUT)

    middleware = []
    if cors_origins:
        # Outside the key check: a browser's preflight carries no key, and a 401 must still carry CORS headers.
        middleware.append(
            Middleware(
                JSONCORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=CORS_METHODS,
                allow_headers=CORS_HEADERS,
                expose_headers=["X-Task-Id", "Idempotent-Replayed", "Retry-After", "WWW-Authenticate"],
                max_age=600,
            )
        )
    if keys is not None and keys.enabled:
        middleware.append(Middleware(AuthMiddleware, keys=keys, public_metrics=public_metrics, dashboard=dashboard))
    app = App(routes=routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan, middleware=middleware)
    app.allowed_hosts = allowed_hosts
    app.router = LiteralRouter(routes=routes, lifespan=lifespan)
    if bentoml_wire != "never":
        app.add_middleware(BentoWire, service=service, mode=bentoml_wire)
    app.state.queue = queue
    app.state.keys = keys
    app.state.limits = limits or InputLimits()
    app.state.body_timeout = body_timeout
    app.state.service = service
    app.state.max_queue = max_queue
    app.state.metrics = metrics
    app.state.drain = DrainRate(queue)
    app.state.webhook_allow = None if webhook_allow is None else frozenset(h.strip().lower() for h in webhook_allow)
    return app


async def _maintain(queue: Queue) -> None:
    """Re-queue tasks of dead workers every second; purge expired ones every minute (or sooner)."""
    last_purge = 0.0
    purge_every = min(60.0, max(1.0, queue.retention / 2))
    while True:
        await asyncio.sleep(1.0)
        try:
            await queue.recover()
            if time.monotonic() - last_purge > purge_every:
                last_purge = time.monotonic()
                purged = await queue.purge()
                if purged:
                    logger.info("purged %d expired task(s)", purged)
        except QueueUnavailable as exc:
            logger.warning("maintenance skipped: %s", exc)
        except Exception:
            logger.exception("maintenance failed")
