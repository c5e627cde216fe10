"""BentoML 1.4 service files under ``taskserve serve``: a ``@bentoml.service`` becomes a :class:`Service`.

Imported only when ``load_service`` meets a BentoML service object, so taskserve itself never
imports or needs bentoml. Each ``@bentoml.task`` becomes a task endpoint and each
``@bentoml.api`` a direct-call endpoint (run by a worker, like ``@taskserve.api``), with the
inputs of the method's own signature: the codec sees the same ``str``, pydantic, PIL, ``Path``
and numpy types BentoML does. ``bentoml.Context`` parameters are injected, never inputs.
Options with a counterpart keep their meaning; each one without is named in a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import logging
import os
import shutil
import typing
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from .exceptions import ServiceDefinitionError
from .service import Endpoint, Service

logger = logging.getLogger("taskserve.bentoml")

# BentoML configuration keys whose meaning taskserve keeps; any other key set on the service is warned about.
_MAPPED_CONFIG = frozenset({"name", "workers", "traffic", "resources"})
# Set by BentoML itself whenever a service has tasks; nothing a user chose.
_TRAFFIC_DEFAULTS = {"external_queue": True}
# BentoML's max_latency_ms bounds a request's whole wait (60 s unless set); taskserve's is how long
# a worker waits for more items. A tenth of the bound, at most this, leaves the rest for the call.
MAX_BATCH_WAIT_MS = 100.0


def is_bentoml_service(obj: Any) -> bool:
    """Whether ``obj`` is what ``@bentoml.service`` returns, told without importing bentoml.

    Raises:
        ServiceDefinitionError: ``obj`` is a BentoML 1.1-style ``bentoml.Service(...)`` with runners.
    """
    kind = type(obj)
    if kind.__name__ != "Service":
        return False
    if kind.__module__.startswith("bentoml._internal"):
        raise ServiceDefinitionError(
            "This is a BentoML 1.1-style bentoml.Service(...) with runners; taskserve serves BentoML 1.2+ "
            "@bentoml.service classes. Write the service as a class (BentoML's own migration guide shows how)."
        )
    return kind.__module__.startswith("_bentoml_sdk")


class BentoService(Service):
    """A BentoML service class run by taskserve workers: built once per worker, then its startup hooks run."""

    startup_hooks: list[str]
    # BentoML starts a service asking for GPUs on a host without any (its workers run on the CPU),
    # so a file written on a GPU box runs on a laptop; taskserve's own services stop instead.
    runs_without_gpus = True

    def instantiate(self) -> Any:
        instance = self.cls()
        for name in self.startup_hooks:
            hook = getattr(instance, name)
            params = inspect.signature(hook).parameters
            result = hook(worker_context()) if params else hook()
            if inspect.isawaitable(result):
                asyncio.run(_awaited(result))  # instantiate runs in a pool thread, off the worker's loop
        return instance


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def from_bentoml(svc: Any, *, warn: bool = True) -> Service:
    """The taskserve :class:`Service` of a ``@bentoml.service`` object.

    Args:
        svc: the object ``@bentoml.service`` returned (``svc.inner`` is the user's class).
        warn: log one warning per BentoML option that taskserve does not honour.
    """
    config: dict[str, Any] = dict(svc.config or {})
    traffic = dict(config.get("traffic") or {})
    timeout = traffic.pop("timeout", None)
    resources = dict(config.get("resources") or {})
    ignored = _ignored(svc, config, traffic, resources)
    gpu = resources.get("gpu")
    endpoints = [_endpoint(name, method, timeout) for name, method in svc.apis.items()]
    hooks = [name for name in dir(svc.inner) if getattr(getattr(svc.inner, name, None), "__bentoml_startup_hook__", 0)]
    service = BentoService(
        svc.inner,
        sorted(endpoints, key=lambda e: e.route),
        name=svc.name,
        workers=_workers(config.get("workers", 1)),
        resources={"gpu": gpu} if gpu else {},
    )
    service.startup_hooks = hooks
    if warn:
        for what in ignored:
            logger.warning("BentoML service %s: %s", svc.name, what)
    return service


def _workers(value: Any) -> int:
    if isinstance(value, int) and value >= 1:
        return value
    if value == "cpu_count":
        return os.cpu_count() or 1
    raise ServiceDefinitionError(f"workers={value!r} of a BentoML service: taskserve takes a number of processes.")


def _ignored(svc: Any, config: dict[str, Any], traffic: dict[str, Any], resources: dict[str, Any]) -> list[str]:
    """One sentence per BentoML option that has no taskserve counterpart, saying what happens instead."""
    out = [
        f"config {key!r} has no taskserve counterpart and is ignored." for key in config if key not in _MAPPED_CONFIG
    ]
    for key, value in traffic.items():
        if _TRAFFIC_DEFAULTS.get(key) == value or (key == "concurrency" and value == 1 and _has_tasks(svc)):
            continue
        out.append(f"traffic {key!r} is ignored (use --concurrency, --max-queue or a task's concurrency=).")
    for key in resources:
        if key != "gpu":
            out.append(f"resources {key!r} is ignored; only 'gpu' is mapped (GPUs per worker).")
    if getattr(svc, "dependencies", None):
        out.append(f"bentoml.depends ({', '.join(svc.dependencies)}) is not served: call the other service's URL.")
    if getattr(svc, "models", None):
        out.append("bentoml.models are not downloaded by taskserve; the service must find its model files itself.")
    if getattr(svc, "mount_apps", None):
        out.append("mounted ASGI apps (bentoml.asgi_app, mount_asgi_app) are not served.")
    if getattr(svc, "middlewares", None):
        out.append("ASGI middlewares (add_asgi_middleware) are not applied.")
    for attr, what in (("image", "image="), ("envs", "envs="), ("labels", "labels="), ("cmd", "cmd=")):
        if getattr(svc, attr, None):
            out.append(f"{what} is a build setting of BentoML and is ignored.")
    for name in dir(svc.inner):
        member = getattr(svc.inner, name, None)
        if getattr(member, "__bentoml_shutdown_hook__", False):
            out.append(f"the shutdown hook {name!r} is not run (workers exit without calling it).")
        if getattr(member, "__bentoml_deployment_hook__", False):
            out.append(f"the deployment hook {name!r} is not run.")
    for name, method in svc.apis.items():
        if method.batchable and tuple(method.batch_dim) != (0, 0):
            out.append(f"{name}: batch_dim={method.batch_dim} is ignored; batches join along axis 0.")
        if getattr(method, "is_stream", False):
            out.append(
                f"{name}: a generator streams to BentoML's clients only; others get the list of what it yielded."
            )
        out += [f"{name}: {what}" for what in _unchecked(method)]
    return out


def _unchecked(method: Any) -> list[str]:
    """The ``bentoml.validators`` of the method's parameters that taskserve does not enforce."""
    out = []
    for param, hint in typing.get_type_hints(method.func, include_extras=True).items():
        if typing.get_origin(hint) is not Annotated:
            continue
        base, *extras = typing.get_args(hint)
        for extra in extras:
            kind = type(extra).__name__
            if not type(extra).__module__.startswith("_bentoml_sdk") or (kind == "DType" and _is_ndarray(base)):
                continue
            out.append(f"{param!r}: the validator {extra!r} is not checked (only DType of an ndarray is).")
    return out


def _is_ndarray(annotation: Any) -> bool:
    return getattr(annotation, "__module__", "") == "numpy" and getattr(annotation, "__name__", "") == "ndarray"


def _has_tasks(svc: Any) -> bool:
    return any(method.is_task for method in svc.apis.values())


def _endpoint(name: str, method: Any, timeout: Any) -> Endpoint:
    fn = _callable(method)
    options: dict[str, Any] = {"name": name, "route": method.route, "is_task": bool(method.is_task)}
    if timeout is not None:
        options["timeout"] = float(timeout)
    if not method.is_task:
        options.update(max_attempts=1, priority=10)
    if method.batchable:
        wait = min(method.max_latency_ms / 10, MAX_BATCH_WAIT_MS)
        options.update(batchable=True, max_batch_size=method.max_batch_size, max_latency_ms=wait)
    try:
        endpoint = Endpoint(fn=fn, **options)
    except ServiceDefinitionError as exc:
        raise ServiceDefinitionError(f"BentoML method {name!r}: {exc}") from None
    endpoint.codec.dump_result = _releasing(endpoint.codec.dump_result)  # type: ignore[method-assign,assignment]
    endpoint.codec.root = _root_input(method)
    return endpoint


def _root_input(method: Any) -> str | None:
    """The name of BentoML's root input: a method's one parameter, positional-only (``def f(self, x, /)``)."""
    params = [p for p in list(inspect.signature(method.func).parameters.values())[1:] if p.name != method.ctx_param]
    if len(params) == 1 and params[0].kind is inspect.Parameter.POSITIONAL_ONLY:
        return params[0].name
    return None


def _callable(method: Any) -> Callable[..., Any]:
    """The method's function with its Context parameter injected and pydantic ``Field`` defaults unwrapped.

    The result's signature is what clients send; the worker calls it as ``fn(instance, **kwargs)``.
    """
    func = method.func
    ctx_param: str | None = method.ctx_param
    hints = typing.get_type_hints(func, include_extras=True)
    params = []
    annotations: dict[str, Any] = {}
    for i, param in enumerate(_parameters(method, hints)):
        if i == 0:
            params.append(param)
            continue
        if param.name == ctx_param:
            continue
        annotation = _pinned(hints.get(param.name, param.annotation))
        default = param.default
        if _is_field_info(default):
            annotation = Annotated[annotation, default]
            default = _field_default(default)
        annotations[param.name] = annotation
        # Positional-only (BentoML's root input): taken by name here, passed by position below.
        kind = param.POSITIONAL_OR_KEYWORD if param.kind is param.POSITIONAL_ONLY else param.kind
        params.append(param.replace(annotation=annotation, default=default, kind=kind))
    if "return" in hints:
        annotations["return"] = hints["return"]
    defaults = {p.name: p.default for p in params[1:] if p.default is not inspect.Parameter.empty}

    route = method.route

    names = [p.name for p in params[1:]]
    declared = list(inspect.signature(func).parameters.values())[1:]
    positional_only = [p.name for p in declared if p.kind is p.POSITIONAL_ONLY]

    def call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # Positional: a batchable function is called with its list of items so.
        given = set(names[: len(args)])
        for key, value in defaults.items():
            if key not in given:
                kwargs.setdefault(key, value)
        if ctx_param is not None:
            kwargs[ctx_param] = worker_context()
        if positional_only and len(args) < len(positional_only):
            args = (*args, *(kwargs.pop(name) for name in positional_only[len(args) :] if name in kwargs))
        return args, kwargs

    wrapper: Callable[..., Any]
    if inspect.isasyncgenfunction(func):

        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            with _in_request(ctx_param, route):
                args, kwargs = call(args, kwargs)
                async for item in func(self, *args, **kwargs):
                    yield item

    elif inspect.isgeneratorfunction(func):

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            with _in_request(ctx_param, route):
                args, kwargs = call(args, kwargs)
                yield from func(self, *args, **kwargs)

    elif inspect.iscoroutinefunction(func):

        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            with _in_request(ctx_param, route) as keep:
                args, kwargs = call(args, kwargs)
                return keep(await func(self, *args, **kwargs))

    else:

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            with _in_request(ctx_param, route) as keep:
                args, kwargs = call(args, kwargs)
                return keep(func(self, *args, **kwargs))

    adapted: Any = functools.update_wrapper(wrapper, func, updated=())
    del adapted.__wrapped__  # inspect must see the signature below, not func's
    adapted.__signature__ = inspect.Signature(params, return_annotation=hints.get("return", Any))
    adapted.__annotations__ = annotations
    return wrapper


def _parameters(method: Any, hints: dict[str, Any]) -> list[inspect.Parameter]:
    """The method's parameters; for ``def f(self, **kwargs)`` with ``input_spec=Model``, the model's fields."""
    declared = list(inspect.signature(method.func).parameters.values())
    if not any(p.kind is p.VAR_KEYWORD for p in declared):
        return declared
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [p for p in declared if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    named = {p.name for p in params}
    for name, field in method.input_spec.model_fields.items():
        if name in named:
            continue
        hints[name] = field.annotation
        default = inspect.Parameter.empty if field.is_required() else _field_default(field)
        params.append(inspect.Parameter(name, keyword, default=default, annotation=field.annotation))
    return params


def _pinned(annotation: Any) -> Any:
    """``Annotated[np.ndarray, DType("float32"), ...]`` (bentoml.validators) as ``NDArray[np.float32]``."""
    if typing.get_origin(annotation) is not Annotated:
        return annotation
    base, *extras = typing.get_args(annotation)
    dtype = next((getattr(x, "dtype", None) for x in extras if type(x).__name__ == "DType"), None)
    if not (isinstance(dtype, str) and _is_ndarray(base)):
        return annotation
    import numpy as np

    return np.ndarray[Any, np.dtype[getattr(np, dtype)]]  # type: ignore[misc]


def _is_field_info(value: Any) -> bool:
    return type(value).__name__ == "FieldInfo" and type(value).__module__.startswith("pydantic")


def _field_default(field: Any) -> Any:
    from pydantic_core import PydanticUndefined

    if field.default is not PydanticUndefined:
        return field.default
    if field.default_factory is not None:
        return field.default_factory()
    return inspect.Parameter.empty


_context: Any = None
# Result files written under ``ctx.temp_dir``, by path: the request's temp dir is kept past the
# call, until the worker has read the file as the task's result (``_releasing``).
_held: dict[str, str] = {}


def _keep_nothing(result: Any) -> Any:
    return result


@contextlib.contextmanager
def _in_request(ctx_param: str | None, route: str) -> Iterator[Callable[[Any], Any]]:
    """Makes ``ctx.request`` answer during the call: a stand-in POST to the route, without the client's headers.

    Yields ``keep(result)``: a ``Path`` result inside ``ctx.temp_dir`` (BentoML's way to return a
    file it wrote) keeps that directory until the result is encoded; BentoML's context would
    delete it as the call returns.
    """
    if ctx_param is None:
        yield _keep_nothing
        return
    from starlette.requests import Request

    scope: dict[str, Any] = {"type": "http", "method": "POST", "path": route, "root_path": "", "scheme": "http"}
    scope.update(headers=[], query_string=b"", server=None, client=None)
    request = Request(scope)

    def keep(result: Any) -> Any:
        temp_dir = getattr(request.state, "temp_dir", None)
        if isinstance(result, os.PathLike) and temp_dir is not None:
            path = os.path.abspath(os.fspath(result))
            if path.startswith(os.path.join(os.path.abspath(temp_dir), "")):
                del request.state.temp_dir  # BentoML releases (empties) only what the request still holds
                _held[path] = temp_dir
        return result

    with worker_context().in_request(request):
        yield keep


def _releasing(dump: Callable[[Any], tuple[bytes, str]]) -> Callable[[Any], tuple[bytes, str]]:
    """``dump_result`` that then deletes the request temp dir a result file was kept in."""

    def dump_result(value: Any) -> tuple[bytes, str]:
        try:
            return dump(value)
        finally:
            if isinstance(value, os.PathLike):
                temp_dir = _held.pop(os.path.abspath(os.fspath(value)), None)
                if temp_dir is not None:
                    shutil.rmtree(temp_dir, ignore_errors=True)

    return dump_result


def worker_context() -> Any:
    """The ``bentoml.Context`` of this worker process: its ``state`` dict lives as long as the worker.

    ``ctx.response`` may be set but is not sent (a task's result has no headers of its own), and
    ``ctx.request`` is a stand-in: the task ran apart from the request that submitted it.
    """
    global _context
    if _context is None:
        _context = importlib.import_module("bentoml").Context()
    return _context
