"""Service definitions: the decorators and the plain data they build.

``@task``/``@api`` only attach an :class:`Endpoint` to the function and return it unchanged,
so a decorated method stays an ordinary method. ``@service`` collects them into a
:class:`Service`. Everything also works without decorators: ``Service(cls, [Endpoint(...)])``.
The API process builds a ``Service`` from the class alone; only workers instantiate it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar, overload

from .exceptions import ServiceDefinitionError

if TYPE_CHECKING:
    from .codec import Codec

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)

ENDPOINT_ATTR = "__taskserve_endpoint__"
MAX_BOUND = 2**31 - 1  # the largest concurrency or max_queue (a store's integer, with room)
SERVICE_ATTR = "__taskserve_service__"
# The server's own paths (server/app.py): an endpoint there would never be reached.
SERVER_ROUTES = frozenset(
    {"/schema.json", "/docs.json", "/healthz", "/readyz", "/workers", "/tasks", "/queues", "/metrics"}
)


@dataclass
class Endpoint:
    """One callable of a service, exposed at ``route``.

    Args:
        fn: the function (a method of the service class, taking ``self`` first).
        name: the attribute clients call it by; defaults to the function's name.
        route: the URL path; defaults to ``/`` + name.
        is_task: a task (submit/status/get/...) or a plain ``@api`` endpoint.
        timeout: seconds one attempt may run before it fails with a timeout.
        max_attempts: how many times the task may be started; a worker that dies, or an
            exception listed in ``retry_on``, uses one up.
        retry_on: exception types after which the task runs again (opt-in).
        retry_delay: seconds before the first automatic retry; each further one waits
            ``retry_backoff`` times longer, give or take 10 % (jitter), so that tasks failing
            together on a shared outage do not come back in lockstep.
        retry_backoff: the factor between two retry delays.
        priority: claimed before lower-priority work; ``@api`` calls default above tasks,
            since a client is waiting on them.
        ttl: seconds a task may wait in the queue after it falls due; not started by then,
            it ends ``failure`` with error type ``Expired`` and never runs.
        concurrency: the most tasks of this route running at once, over all workers and hosts
            (a GPU-bound or rate-limited backend); ``None`` for no cap beyond the workers.
        max_queue: the most pending tasks of this route; a submit beyond it is refused
            (HTTP 429) rather than queued behind work that cannot finish in time.
        batchable: queued tasks of this route are run together in one call. The function
            takes one parameter, a ``list`` (or ``numpy.ndarray``, batch axis 0), and returns
            a list (or array) of the same length, item *i* answering input *i*.
        max_batch_size: the most items one call of a batchable function gets.
        max_latency_ms: how long a worker waits for more items while the queue holds fewer
            than a full batch.
    """

    fn: Callable[..., Any]
    name: str = ""
    route: str = ""
    is_task: bool = True
    timeout: float | None = None
    max_attempts: int = 3
    retry_on: tuple[type[BaseException], ...] = ()
    priority: int = 0
    batchable: bool = False
    max_batch_size: int = 64
    max_latency_ms: float = 10.0
    retry_delay: float = 1.0
    retry_backoff: float = 2.0
    ttl: float | None = None
    concurrency: int | None = None
    max_queue: int | None = None

    def __post_init__(self) -> None:
        self.name = self.name or self.fn.__name__
        route = self.route or f"/{self.name}"
        self.route = "/" + route.strip("/")
        if self.route == "/":
            raise ServiceDefinitionError(f"Endpoint {self.name!r} needs a route other than '/'.")
        if self.route in SERVER_ROUTES:
            raise ServiceDefinitionError(
                f"Endpoint {self.name!r} cannot have the route {self.route!r}: the server answers there "
                "(docs/api.md). Give it another, as in @task(route='/my-tasks')."
            )
        if self.max_attempts < 1:
            raise ServiceDefinitionError(f"max_attempts of {self.name!r} must be at least 1, got {self.max_attempts}.")
        if self.timeout is not None and self.timeout <= 0:
            raise ServiceDefinitionError(f"timeout of {self.name!r} must be positive, got {self.timeout}.")
        if self.ttl is not None and self.ttl <= 0:
            raise ServiceDefinitionError(f"ttl of {self.name!r} must be positive, got {self.ttl}.")
        if self.retry_delay < 0 or self.retry_backoff < 1:
            raise ServiceDefinitionError(
                f"{self.name!r} needs retry_delay >= 0 and retry_backoff >= 1, "
                f"got {self.retry_delay} and {self.retry_backoff}."
            )
        for option in ("concurrency", "max_queue"):
            value = getattr(self, option)
            if value is not None and (not isinstance(value, int) or not 1 <= value <= MAX_BOUND):
                raise ServiceDefinitionError(
                    f"{option} of {self.name!r} must be a whole number from 1 to {MAX_BOUND:,}, got {value!r}."
                )
        if self.max_batch_size < 1 or self.max_latency_ms < 0:
            raise ServiceDefinitionError(
                f"{self.name!r} needs max_batch_size >= 1 and max_latency_ms >= 0, "
                f"got {self.max_batch_size} and {self.max_latency_ms}."
            )
        if self.batchable:
            self._check_batchable()

    def _check_batchable(self) -> None:
        if self.codec.streams:
            raise ServiceDefinitionError(f"Batchable {self.name!r} cannot be a generator: one call serves many tasks.")
        params = self.codec.params
        if len(params) != 1 or params[0].kind not in ("json", "ndarray"):
            raise ServiceDefinitionError(
                f"Batchable {self.name!r} must take exactly one parameter, a list (or numpy.ndarray) of inputs; "
                f"it takes {[p.name for p in params]}."
            )
        param = params[0]
        origin = typing.get_origin(param.annotation)
        if param.kind == "json" and origin is not list:
            raise ServiceDefinitionError(
                f"Parameter {param.name!r} of batchable {self.name!r} must be annotated list[...] or "
                f"numpy.ndarray, not {param.annotation!r}."
            )

    @property
    def batch_param(self) -> str:
        """The one parameter of a batchable function."""
        return self.codec.params[0].name

    @property
    def is_async(self) -> bool:
        """Runs on the worker's event loop: a coroutine function or an async generator."""
        return inspect.iscoroutinefunction(self.fn) or inspect.isasyncgenfunction(self.fn)

    @cached_property
    def codec(self) -> Codec:
        from .codec import Codec

        return Codec(self.fn, self.name)


def _endpoint_decorator(is_task: bool, fn: Any, options: dict[str, Any]) -> Any:
    def wrap(f: F) -> F:
        if not callable(f):
            raise ServiceDefinitionError(f"@{'task' if is_task else 'api'} decorates a function, got {f!r}.")
        opts = dict(options)
        if not is_task:
            opts.setdefault("max_attempts", 1)
            opts.setdefault("priority", 10)
        setattr(f, ENDPOINT_ATTR, Endpoint(fn=f, is_task=is_task, **opts))
        return f

    return wrap(fn) if fn is not None else wrap


@overload
def task(fn: F) -> F: ...
@overload
def task(
    *,
    name: str = "",
    route: str = "",
    timeout: float | None = None,
    max_attempts: int = 3,
    retry_on: tuple[type[BaseException], ...] = (),
    priority: int = 0,
    batchable: bool = False,
    max_batch_size: int = 64,
    max_latency_ms: float = 10.0,
    retry_delay: float = 1.0,
    retry_backoff: float = 2.0,
    ttl: float | None = None,
    concurrency: int | None = None,
    max_queue: int | None = None,
) -> Callable[[F], F]: ...
def task(fn: Any = None, **options: Any) -> Any:
    """Mark a method as a task: clients submit it, get an id at once and fetch the result later.

    Args:
        route: URL path, default ``/`` + the method name.
        timeout: seconds one attempt may run.
        max_attempts: starts allowed in all; a lost worker uses one up (default 3).
        retry_on: exception types that make the task run again while attempts remain, after
            ``retry_delay`` seconds, then ``retry_backoff`` times longer each time (±10 %).
        priority: higher runs first.
        ttl: seconds a task may wait to start; later, it fails ``Expired`` without running.
        concurrency: the most tasks of this route running at once, across all workers.
        max_queue: the most pending tasks of this route; more are refused with HTTP 429.
        batchable: run queued tasks of this route together, in one call of up to
            ``max_batch_size`` items, waiting at most ``max_latency_ms`` for more.

    Example:
        >>> @taskserve.task(timeout=600)
        ... def generate(self, prompt: str) -> Image: ...
    """
    return _endpoint_decorator(True, fn, options)


@overload
def api(fn: F) -> F: ...
@overload
def api(*, name: str = "", route: str = "", timeout: float | None = None, priority: int = 10) -> Callable[[F], F]: ...
def api(fn: Any = None, **options: Any) -> Any:
    """Mark a method as a synchronous endpoint: ``POST /{route}`` answers with the result.

    It still runs in a worker process (the only place the service is instantiated), at a
    higher priority than tasks, so a waiting caller is served first.

    Example:
        >>> @taskserve.api
        ... def describe(self, text: str) -> dict: ...
    """
    return _endpoint_decorator(False, fn, options)


@dataclass
class Service:
    """A service class and its endpoints.

    Args:
        cls: the user's class; instantiated once per worker process.
        endpoints: its tasks and APIs.
        name: shown in logs and the schema; defaults to the class name.
        workers: default number of worker processes for ``taskserve serve``.
        resources: what each worker process needs; ``{"gpu": N}`` gives every worker N GPUs
            of its own (or a share of one, for N below 1) through ``CUDA_VISIBLE_DEVICES``.
    """

    cls: type
    endpoints: list[Endpoint] = field(default_factory=list)
    name: str = ""
    workers: int = 1
    resources: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = self.name or self.cls.__name__
        seen: dict[str, str] = {}
        for ep in self.endpoints:
            if ep.route in seen:
                raise ServiceDefinitionError(
                    f"Endpoints {seen[ep.route]!r} and {ep.name!r} both use route {ep.route!r}; give one another route."
                )
            seen[ep.route] = ep.name
            ep.codec  # noqa: B018 - check every signature now, not at the first request
        if not self.endpoints:
            raise ServiceDefinitionError(f"{self.name} has no @taskserve.task or @taskserve.api methods.")

    @property
    def gpus_per_worker(self) -> float:
        """GPUs each worker needs (0: none)."""
        gpu = self.resources.get("gpu", 0) or 0
        try:
            return float(gpu)
        except (TypeError, ValueError):
            raise ServiceDefinitionError(f"resources={{'gpu': {gpu!r}}} of {self.name} must be a number.") from None

    @classmethod
    def from_class(
        cls, klass: type, *, name: str = "", workers: int = 1, resources: dict[str, Any] | None = None
    ) -> Service:
        endpoints = []
        for attr in dir(klass):
            member = inspect.getattr_static(klass, attr, None)
            if isinstance(member, (staticmethod, classmethod)):
                continue
            ep = getattr(member, ENDPOINT_ATTR, None)
            if isinstance(ep, Endpoint):
                endpoints.append(ep)
        endpoints.sort(key=lambda e: e.route)
        return cls(klass, endpoints, name=name, workers=workers, resources=dict(resources or {}))

    @property
    def by_route(self) -> dict[str, Endpoint]:
        return {ep.route: ep for ep in self.endpoints}

    def instantiate(self) -> Any:
        return self.cls()


@overload
def service(cls: C) -> C: ...
@overload
def service(*, name: str = "", workers: int = 1, resources: dict[str, Any] | None = None) -> Callable[[C], C]: ...
def service(cls: Any = None, *, name: str = "", workers: int = 1, resources: dict[str, Any] | None = None) -> Any:
    """Mark a class as a taskserve service, collecting its ``@task`` and ``@api`` methods.

    Args:
        name: the service's name, default the class name.
        workers: default number of worker processes when served.
        resources: ``{"gpu": N}``: N GPUs per worker (a fraction below 1 shares one GPU);
            ``taskserve serve`` starts one worker per N GPUs found.

    Example:
        >>> @taskserve.service(workers=2)
        ... class ImageGenerationService: ...
    """

    def wrap(klass: C) -> C:
        setattr(klass, SERVICE_ATTR, Service.from_class(klass, name=name, workers=workers, resources=resources))
        return klass

    return wrap(cls) if cls is not None else wrap


def load_service(target: str, *, warn: bool = True) -> Service:
    """Import ``"module:Class"`` (from the working directory too, as uvicorn does) as a Service.

    ``"path/to/file.py:Class"`` imports the file by its name from its folder, as BentoML's CLI
    takes it. A BentoML service (``@bentoml.service``) is adapted (``taskserve._bentoml``); ``warn`` logs
    which of its options have no counterpart here (the API process does, its workers need not).
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ServiceDefinitionError(f"Expected MODULE:Class, like examples.image_generation:Service; got {target!r}.")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if module_name.endswith(".py"):
        folder, module_name = os.path.split(os.path.abspath(module_name[:-3]))
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ServiceDefinitionError(f"Cannot import module {module_name!r}: {exc}.") from exc
        raise
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ServiceDefinitionError(f"Module {module_name!r} has no attribute {attr!r}.") from None
    if isinstance(obj, Service):
        return obj
    spec = getattr(obj, SERVICE_ATTR, None)
    if isinstance(spec, Service) and spec.cls is obj:
        return spec
    if isinstance(obj, type):
        return Service.from_class(obj)
    from ._bentoml import from_bentoml, is_bentoml_service  # imports no bentoml

    if is_bentoml_service(obj):
        return from_bentoml(obj, warn=warn)
    raise ServiceDefinitionError(f"{target!r} is not a service class.")
