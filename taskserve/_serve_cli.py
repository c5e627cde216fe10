"""``taskserve serve``: the API server and its worker processes, in one command.

Its options mirror the ``create_app`` and Worker arguments, and it owns the shutdown
(drain the workers, force on a second signal, exit on a third), so it is the bulk of the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import click

from ._cli_common import (
    SHUTDOWN_REQUESTS,
    ByteSize,
    check_runtime_dir,
    common_options,
    gpus_option,
    lock_timeout_option,
    open_queue,
    run_loop,
    setup_logging,
    setup_tracing,
    stop_signals,
    worker_metrics_dir,
    worker_plan,
)

if TYPE_CHECKING:
    from .supervisor import Supervisor

SHUTDOWN_MARGIN = 10.0  # seconds past the grace after which a stuck shutdown is forced, then cut short
logger = logging.getLogger("taskserve")


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


@click.command()
@common_options
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
@lock_timeout_option
@gpus_option
def serve(target: str, host: str, port: int, workers: int | None, max_body_size: int, **options: Any) -> None:
    """Run the API server and worker processes for TARGET (module:Class)."""
    setup_logging(options)
    setup_tracing()
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
        check_runtime_dir(options["broker"])
        with worker_metrics_dir(options["broker"], workers != 0) as metrics_dir:
            run_loop(_serve(target, sock, host, port, workers, max_body_size, metrics_dir=metrics_dir, **options))
    finally:
        sock.close()


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


def _access(keys: Any) -> str:
    """Who may call, for the start-up line: the keys' owners only, a secret never reaches a log."""
    if not keys.enabled:
        return "open to all (no API key)"
    return f"API keys of {', '.join(keys.owners()) or 'nobody yet (every request refused)'}"


@contextlib.contextmanager
def _reload_keys_on_hangup(keys: Any) -> Generator[None, None, None]:
    """SIGHUP reads the keys file again, without a restart or a dropped connection.

    Without a keys file it only logs: a ``reload`` (systemd's, say) must not stop the server,
    which SIGHUP's default action would.
    """
    if not hasattr(signal, "SIGHUP"):
        yield
        return
    loop = asyncio.get_running_loop()
    if keys.path is None:
        loop.add_signal_handler(signal.SIGHUP, logger.info, "SIGHUP: nothing to reload (no --api-keys-file)")
    else:
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
    count, plan = worker_plan(service, workers, gpus)
    queue = open_queue(broker, retention, busy_timeout)  # connected by the app's lifespan
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

    with stop_signals(on_signal), _reload_keys_on_hangup(keys):
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


def _kill_workers(supervisor: Supervisor | None) -> None:
    """SIGKILL every worker still running (they would follow us anyway, by their parent watch).

    Typed, not ``Any``: the last-resort exit calls it just before ``os._exit``, a path no normal
    stop takes, so an error here (it once iterated the method ``pids``) would keep a stuck
    server alive past its limit unnoticed.
    """
    for pid in supervisor.pids() if supervisor is not None else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
