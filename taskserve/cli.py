"""``taskserve serve``, ``taskserve worker``: options mirror the Worker and create_app arguments."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

import click

from . import __version__

DEFAULT_BROKER = "sqlite:///taskserve.db"
SHUTDOWN_REQUESTS = 5  # seconds open requests get at shutdown before they are cancelled
SHUTDOWN_MARGIN = 10.0  # seconds past the grace after which a stuck shutdown is forced, then cut short
logger = logging.getLogger("taskserve")
T = TypeVar("T")


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (the API and workers spend their time in the loop)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _setup_logging(options: dict[str, Any]) -> None:
    from . import _logging

    _logging.setup(options.pop("log_level"), options.pop("log_format"))


def _setup_tracing() -> None:
    from .tracing import configure

    configure()


def _common(fn: Any) -> Any:
    options = [
        click.argument("target"),
        click.option(
            "--broker",
            envvar="TASKSERVE_BROKER",
            default=DEFAULT_BROKER,
            show_default=True,
            help="sqlite:///path/tasks.db or redis://host:port/db (env TASKSERVE_BROKER).",
        ),
        click.option(
            "--concurrency",
            default=1,
            show_default=True,
            type=click.IntRange(min=1),
            help="Tasks each worker process runs at once.",
        ),
        click.option(
            "--lease",
            default=30.0,
            show_default=True,
            type=click.FloatRange(min=0.1),
            envvar="TASKSERVE_LEASE",
            help="Seconds before a silent worker's task runs again.",
        ),
        click.option(
            "--grace",
            default=30.0,
            show_default=True,
            type=click.FloatRange(min=0),
            help="Seconds running tasks get to finish at shutdown.",
        ),
        click.option(
            "--retention",
            default=None,
            type=click.FloatRange(min=0),
            envvar="TASKSERVE_RETENTION",
            help="Seconds finished tasks and results are kept [default: 86400].",
        ),
        click.option(
            "--log-level",
            default="info",
            type=click.Choice(["debug", "info", "warning", "error"]),
            show_default=True,
            envvar="TASKSERVE_LOG_LEVEL",
        ),
        click.option(
            "--log-format",
            default="text",
            type=click.Choice(["text", "json"]),
            show_default=True,
            envvar="TASKSERVE_LOG_FORMAT",
            help="json: one JSON object a line: time, level, logger, message, traceback (env TASKSERVE_LOG_FORMAT).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _gpus_option(fn: Any) -> Any:
    return click.option(
        "--gpus",
        default=None,
        metavar="IDS",
        help="GPU ids to spread the workers over, like 0,1 [default: CUDA_VISIBLE_DEVICES, else nvidia-smi -L].",
    )(fn)


def _auth_options(fn: Any) -> Any:
    """Access control (SPEC §10); see docs/security.md."""
    options = [
        click.option(
            "--api-key",
            "api_keys",
            multiple=True,
            metavar="[NAME=]KEY",
            help="Require this key (repeatable; also env TASKSERVE_API_KEYS=k1,k2). A key sees only its own tasks.",
        ),
        click.option(
            "--admin-key",
            "admin_keys",
            multiple=True,
            metavar="[NAME=]KEY",
            help="A key that sees and manages every task (repeatable; also env TASKSERVE_ADMIN_KEYS).",
        ),
        click.option(
            "--api-keys-file",
            envvar="TASKSERVE_API_KEYS_FILE",
            default=None,
            type=click.Path(dir_okay=False),
            help="Keys from a file, one NAME=KEY a line, read again on SIGHUP (env TASKSERVE_API_KEYS_FILE).",
        ),
        click.option(
            "--public-metrics",
            is_flag=True,
            default=False,
            help="Serve /metrics without a key (for a Prometheus scraper on a trusted network).",
        ),
        click.option(
            "--cors-origin",
            "cors_origins",
            multiple=True,
            metavar="ORIGIN",
            help="Let browser pages of this origin call the API, as https://app.example.com (repeatable) "
            "[default: none].",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _lock_timeout_option(fn: Any) -> Any:
    return click.option(
        "--lock-timeout",
        default=5.0,
        show_default=True,
        type=click.FloatRange(min=0),
        help="SQLite: kill and replace a worker holding the store's write lock this many seconds "
        "(frozen: every write waits on it); 0 never does.",
    )(fn)


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_SIZE_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30})


class ByteSize(click.ParamType[int]):
    """A number of bytes: 500000, 100MB, 1.5GB, 512MiB."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace(" ", "")
        number = text.rstrip("kmgib")
        unit = text[len(number) :]
        try:
            if unit not in _SIZE_UNITS or float(number) < 0:
                raise ValueError
            return int(float(number) * _SIZE_UNITS[unit])
        except ValueError:
            self.fail(f"{value!r} is not a size: write bytes, or a number with kB, MB, GB (or KiB, MiB, GiB).")


def _worker_plan(service: Any, workers: int | None, gpus: str | None) -> tuple[int, list[list[str]] | None]:
    """How many workers to start and the GPU ids of each (None: leave CUDA_VISIBLE_DEVICES alone).

    A service with ``resources={"gpu": N}`` gets one worker per N GPUs found (fewer if
    ``--workers`` says so); asking for more than there are stops start-up, naming the numbers.
    """
    from . import devices

    per_worker = service.gpus_per_worker
    if workers == 0:
        return 0, None
    if per_worker <= 0:
        count = service.workers if workers is None else workers
        return count, None if gpus is None else [devices.discover(gpus)[0]] * count
    found, source = devices.discover(gpus)
    if not found and getattr(service, "runs_without_gpus", False):
        count = service.workers if workers is None else workers
        logger.warning(
            "The service asks for %g GPU(s) per worker, but no GPU was found (from %s): "
            "its %d worker(s) run without one, as BentoML's would.",
            per_worker,
            source,
            count,
        )
        return count, None
    try:
        plan = devices.assign(per_worker, found, workers, source)
    except devices.DeviceError as exc:
        raise click.ClickException(str(exc)) from None
    return len(plan), plan


@click.group()
@click.version_option(__version__, prog_name="taskserve")
def cli() -> None:
    """Serve model inference as durable async tasks."""


@cli.command()
@_common
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True, type=int)
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(min=0),
    help="Worker processes; 0 runs the API alone [default: the service's own, else 1].",
)
@click.option(
    "--max-body-size",
    default=100 * 1024 * 1024,
    show_default=True,
    type=int,
    help="Largest request body accepted, in bytes.",
)
@click.option(
    "--call-timeout",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds a direct call (POST /{route}) waits for its result before answering 504.",
)
@click.option(
    "--max-queue",
    default=None,
    type=click.IntRange(min=1, max=2**31 - 1),
    help="Most pending tasks per route; more submits get 429 with Retry-After [default: no bound; "
    "a task's own max_queue wins].",
)
@click.option(
    "--max-image-pixels",
    default=64_000_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest image argument, in pixels (width x height, read from its header before decoding).",
)
@click.option(
    "--max-array-bytes",
    default=256 * 1024 * 1024,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest numpy array argument, in bytes once decoded.",
)
@click.option(
    "--max-array-elements",
    default=2**27,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest numpy array argument, in elements.",
)
@click.option(
    "--webhook-secret",
    envvar="TASKSERVE_WEBHOOK_SECRET",
    default=None,
    metavar="whsec_...",
    help="Sign webhooks with this secret, Standard Webhooks style (env TASKSERVE_WEBHOOK_SECRET) "
    "[default: unsigned, with a warning].",
)
@click.option(
    "--webhook-allow",
    default=None,
    metavar="HOST[,HOST...]",
    help="Refuse (422) a submit whose webhook URL names another host [default: any host].",
)
@click.option(
    "--webhook-tries",
    default=6,
    show_default=True,
    type=click.IntRange(min=1),
    help="Tries of one webhook delivery, the first included, before it is marked failed.",
)
@click.option(
    "--webhook-retry-delay",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds before a webhook's first retry; each next one waits 5 times longer.",
)
@click.option(
    "--public-url",
    envvar="TASKSERVE_PUBLIC_URL",
    default=None,
    metavar="URL",
    help="This server's base URL as clients reach it, for absolute result_url links in webhooks "
    "(env TASKSERVE_PUBLIC_URL) [default: the path alone].",
)
@click.option(
    "--busy-timeout",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="SQLite: seconds a submit (or other write) waits for the store's write lock before answering "
    "503 with Retry-After.",
)
@click.option(
    "--min-free-disk",
    default="100MB",
    show_default=True,
    type=ByteSize(),
    help="/readyz answers 503 while the store's directory, the runtime or the temp directory has less "
    "free space; 0: no check.",
)
@click.option(
    "--bentoml-wire",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "always", "never"]),
    help="Answer in BentoML's wire format: auto: requests of BentoML's clients (by User-Agent); "
    "always; never (docs/bentoml.md).",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="HOST",
    help="Answer only requests whose Host is HOST (repeatable; *.example.com for subdomains); others get 400. "
    "Set it when browsers can reach the server: without it a web page can reach it by DNS rebinding "
    "[default: any host].",
)
@click.option(
    "--header-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds a client may take to send a request's line and headers; slower gets 408 and is closed.",
)
@click.option(
    "--body-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds a request body may stop arriving (between two reads) before the request gets 408.",
)
@click.option(
    "--max-connections",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Open connections at most; a new one past it gets 503 with Retry-After (keep it under ulimit -n).",
)
@_auth_options
@_lock_timeout_option
@_gpus_option
def serve(target: str, host: str, port: int, workers: int | None, max_body_size: int, **options: Any) -> None:
    """Run the API server and worker processes for TARGET (module:Class)."""
    _setup_logging(options)
    _setup_tracing()
    if options["webhook_secret"] is not None:
        from .webhooks import parse_secret

        try:
            parse_secret(options["webhook_secret"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--webhook-secret") from None
    from .server.auth import keys_from_env

    try:
        options["keys"] = keys_from_env(
            options.pop("api_keys"), options.pop("admin_keys"), options.pop("api_keys_file")
        )
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        # The message names the file or says the key is empty; it never holds a secret.
        raise click.BadParameter(f"cannot read the API keys: {exc}", param_hint="--api-key/--api-keys-file") from None
    sock = _listen(host, port)
    try:
        _check_runtime_dir(options["broker"])
        with _metrics_dir(options["broker"], workers != 0) as metrics_dir:
            _run(_serve(target, sock, host, port, workers, max_body_size, metrics_dir=metrics_dir, **options))
    finally:
        sock.close()


@cli.command()
@_common
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(min=1),
    help="Worker processes to run [default: the service's own, else 1].",
)
@click.option(
    "--metrics-port",
    default=None,
    type=click.IntRange(min=0, max=65535),
    help="Serve these workers' Prometheus metrics at http://HOST:PORT/metrics [default: not served].",
)
@click.option("--metrics-host", default="0.0.0.0", show_default=True, help="The address --metrics-port listens on.")
@_lock_timeout_option
@_gpus_option
def worker(target: str, workers: int | None, metrics_port: int | None, metrics_host: str, **options: Any) -> None:
    """Run worker processes only (for instance on another machine) for TARGET."""
    _setup_logging(options)
    _check_runtime_dir(options["broker"])
    with _metrics_dir(options["broker"], metrics_port is not None) as metrics_dir:
        server = None if metrics_dir is None else _serve_metrics(metrics_host, metrics_port or 0, metrics_dir)
        try:
            _run(_workers_only(target, workers, metrics_dir=metrics_dir, **options))
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()


def _serve_metrics(host: str, port: int, metrics_dir: str) -> Any:
    """The workers' metrics over HTTP, from a thread, for a Prometheus on another host to scrape."""
    from prometheus_client import CollectorRegistry, start_http_server

    from .server.metrics import register_workers

    registry = CollectorRegistry()
    register_workers(registry, metrics_dir)
    try:
        server, _ = start_http_server(port, host, registry)
    except OSError as exc:
        raise click.ClickException(
            f"Cannot serve metrics on {host}:{port}: {exc.strerror or exc}. Choose another --metrics-port."
        ) from None
    return server


@cli.command("run-worker", hidden=True)
@_common
def run_worker(target: str, **options: Any) -> None:
    """One worker in this process (what the supervisor starts)."""
    from .worker.process import WORKER_ID, ParentWatch, flush_logs, run_worker_process

    watch = ParentWatch.from_env()  # first: the supervisor may die while the service imports
    _setup_logging(options)
    _setup_tracing()
    broker = options.pop("broker")
    code = _run(run_worker_process(target, broker, name=os.environ.get(WORKER_ID), watch=watch, **options))
    if code:
        # Recycled: a task's thread is stuck (in C code, say). Its tasks are handed back; exiting
        # normally would wait for that thread for ever, holding the process and its GPU.
        flush_logs()
        os._exit(code)
    sys.exit(code)


@contextlib.contextmanager
def _metrics_dir(broker: str, wanted: bool) -> Generator[str | None, None, None]:
    """The workers' private PROMETHEUS_MULTIPROC_DIR, removed when we stop (swept at start after a kill -9)."""
    from . import _runtime

    if not wanted:
        yield None
        return
    with _runtime.scratch_dir(_runtime.store_key(broker), _runtime.METRICS) as path:
        yield path


def _open_queue(broker: str, retention: float | None, busy_timeout: float | None = None) -> Any:
    from .queue import Queue

    options: dict[str, Any] = {} if retention is None else {"retention": retention}
    if busy_timeout is not None and broker.startswith("sqlite:"):
        options["busy_timeout"] = busy_timeout
    try:
        return Queue.from_url(broker, **options)
    except (ValueError, ImportError) as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from None
    except PermissionError as exc:  # a runtime directory that is not ours (see _runtime)
        raise click.ClickException(str(exc)) from None


def _check_runtime_dir(broker: str) -> None:
    """Refuse a foreign runtime directory here, once and clearly, rather than in every worker; sweep."""
    from . import _runtime

    try:
        _runtime.check_private(_runtime.runtime_dir(_runtime.store_key(broker)))
        _runtime.sweep_all()  # what processes killed earlier left, of any store
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from None
    except _runtime.RuntimeDirError as exc:
        raise click.ClickException(str(exc)) from None


def _listen(host: str, port: int) -> socket.socket:
    """Bind the API's socket before anything else starts: a port in use must stop us before any worker."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise click.ClickException(
            f"Cannot listen on {host}:{port}: {exc.strerror or exc}. Is another server using it? "
            "Choose another port with --port (or another address with --host)."
        ) from None
    sock.set_inheritable(False)
    return sock


async def _connect(queue: Any) -> None:
    from .exceptions import QueueUnavailable

    try:
        await queue.connect()
    except QueueUnavailable as exc:
        # Keep running: the API answers 503 and workers retry until the broker comes back.
        logger.warning("%s Carrying on; it will be retried.", exc)


@contextlib.contextmanager
def _signals(on_signal: Any) -> Generator[None, None, None]:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _access(keys: Any) -> str:
    """Who may call, for the start-up line: the keys' owners only, a secret never reaches a log."""
    if not keys.enabled:
        return "open to all (no API key)"
    return f"API keys of {', '.join(keys.owners()) or 'nobody yet (every request refused)'}"


@contextlib.contextmanager
def _reload_keys_on_hangup(keys: Any) -> Generator[None, None, None]:
    """SIGHUP reads the keys file again, without a restart or a dropped connection."""
    if keys.path is None or not hasattr(signal, "SIGHUP"):
        yield
        return
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, keys.reload)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


async def _serve(
    target: str,
    sock: socket.socket,
    host: str,
    port: int,
    workers: int | None,
    max_body_size: int,
    *,
    call_timeout: float,
    max_queue: int | None,
    max_image_pixels: int,
    max_array_bytes: int,
    max_array_elements: int,
    webhook_secret: str | None,
    webhook_allow: str | None,
    webhook_tries: int,
    webhook_retry_delay: float,
    public_url: str | None,
    busy_timeout: float,
    min_free_disk: int,
    lock_timeout: float,
    bentoml_wire: Any,
    allowed_hosts: tuple[str, ...],
    header_timeout: float,
    body_timeout: float,
    max_connections: int,
    broker: str,
    concurrency: int,
    lease: float,
    grace: float,
    retention: float | None,
    gpus: str | None,
    metrics_dir: str | None,
    keys: Any,
    public_metrics: bool,
    cors_origins: tuple[str, ...],
) -> None:
    import uvicorn

    from ._wire import InputLimits
    from .exceptions import ServiceDefinitionError
    from .server import create_app
    from .server._protocol import protocol_class
    from .service import load_service
    from .supervisor import Supervisor

    try:
        service = load_service(target)
    except ServiceDefinitionError as exc:
        raise click.ClickException(str(exc)) from None
    count, plan = _worker_plan(service, workers, gpus)
    queue = _open_queue(broker, retention, busy_timeout)  # connected by the app's lifespan
    supervisor = None
    if count:
        supervisor = Supervisor(
            target,
            broker,
            queue,
            workers=count,
            concurrency=concurrency,
            lease=lease,
            grace=grace,
            retention=retention,
            devices=plan,
            metrics_dir=metrics_dir,
            lock_timeout=lock_timeout or None,
        )
    app = create_app(
        service,
        queue,
        max_body_size=max_body_size,
        worker_pids=supervisor.pids if supervisor else None,
        call_timeout=call_timeout,
        limits=InputLimits(max_image_pixels, max_array_bytes, max_array_elements),
        max_queue=max_queue,
        metrics_dir=metrics_dir if supervisor else None,
        webhook_secret=webhook_secret,
        webhook_allow=None if webhook_allow is None else [h for h in webhook_allow.split(",") if h.strip()],
        webhook_tries=webhook_tries,
        webhook_retry_delay=webhook_retry_delay,
        public_url=public_url,
        min_free_disk=min_free_disk,
        bentoml_wire=bentoml_wire,
        api_keys=keys,
        public_metrics=public_metrics,
        cors_origins=cors_origins,
        allowed_hosts=list(allowed_hosts) or None,
        body_timeout=body_timeout,
    )

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            yield  # we handle signals ourselves, to drain the workers too

    # Requests still open at shutdown (long polls of wait, slow uploads) get a few seconds,
    # then are cancelled: a shutdown never waits on a client.
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        # JSON logs: uvicorn's own loggers go through the root's JSON handler, not its text one.
        log_config=None if os.environ.get("TASKSERVE_LOG_FORMAT") == "json" else uvicorn.config.LOGGING_CONFIG,
        lifespan="on",
        access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_REQUESTS,
        # The header timeout, the connection cap and JSON for uvicorn's own errors (server/_protocol.py).
        http=protocol_class(header_timeout, max_connections),
    )
    server = Server(config)
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        server.should_exit = True
        if signals == 1:
            logger.info("shutting down: draining workers (Ctrl-C again to force)")
            # Whatever hangs (a broker that went away mid-shutdown), the process ends:
            # past the workers' grace and a margin, the shutdown is forced as by a second signal.
            asyncio.get_running_loop().call_later(grace + SHUTDOWN_MARGIN, on_signal)
        elif signals == 2:
            server.force_exit = True
            if supervisor is not None:
                asyncio.get_running_loop().create_task(supervisor.stop(force=True))
            # And should even the forced stop hang, the process ends a margin later all the same.
            asyncio.get_running_loop().call_later(SHUTDOWN_MARGIN, on_signal)
        else:
            logger.error("shutdown did not finish in time; exiting now")
            _kill_workers(supervisor)
            if metrics_dir is not None:  # os._exit skips its removal on the way out
                shutil.rmtree(metrics_dir, ignore_errors=True)
            os._exit(1)

    with _signals(on_signal), _reload_keys_on_hangup(keys):
        logger.info(
            "serving %s at http://%s:%d | broker %s | %d worker process(es) x concurrency %d | %s",
            service.name,
            host,
            port,
            queue.describe(),
            count,
            concurrency,
            _access(keys),
        )
        if supervisor is not None:
            await supervisor.start()
        try:
            await server.serve(sockets=[sock])
        finally:
            if supervisor is not None:
                await supervisor.stop(force=signals > 1)
    logger.info("stopped")


def _kill_workers(supervisor: Any) -> None:
    """SIGKILL every worker still running (they would follow us anyway, by their parent watch)."""
    for pid in supervisor.pids if supervisor is not None else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def _workers_only(
    target: str,
    workers: int | None,
    *,
    broker: str,
    concurrency: int,
    lease: float,
    grace: float,
    retention: float | None,
    gpus: str | None,
    metrics_dir: str | None,
    lock_timeout: float,
) -> None:
    from .exceptions import ServiceDefinitionError
    from .service import load_service
    from .supervisor import Supervisor

    try:
        service = load_service(target)  # fail here, clearly, rather than in every child
    except ServiceDefinitionError as exc:
        raise click.ClickException(str(exc)) from None
    count, plan = _worker_plan(service, workers, gpus)  # as `serve` does
    queue = _open_queue(broker, retention)
    await _connect(queue)
    supervisor = Supervisor(
        target,
        broker,
        queue,
        workers=count,
        concurrency=concurrency,
        lease=lease,
        grace=grace,
        retention=retention,
        devices=plan,
        metrics_dir=metrics_dir,
        lock_timeout=lock_timeout or None,
    )
    stop = asyncio.Event()
    with _signals(stop.set):
        logger.info(
            "running %d worker process(es) x concurrency %d for %s | broker %s",
            count,
            concurrency,
            service.name,
            queue.describe(),
        )
        await supervisor.start()
        await stop.wait()
        logger.info("shutting down: draining workers")
        await supervisor.stop()
    with contextlib.suppress(asyncio.TimeoutError):  # a broker that went away must not hold us
        await asyncio.wait_for(queue.close(), SHUTDOWN_REQUESTS)
    logger.info("stopped")


from ._ops_cli import register  # noqa: E402 - the operator's commands join the group defined above

register(cli)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli()
