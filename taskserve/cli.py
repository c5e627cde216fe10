"""``taskserve serve``, ``taskserve worker``: options mirror the Worker and create_app arguments."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

import click

from . import __version__

DEFAULT_BROKER = "sqlite:///taskserve.db"
logger = logging.getLogger("taskserve")
T = TypeVar("T")


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (the API and workers spend their time in the loop)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


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
            "--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]), show_default=True
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


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
def serve(target: str, host: str, port: int, workers: int | None, max_body_size: int, **options: Any) -> None:
    """Run the API server and worker processes for TARGET (module:Class)."""
    _setup_logging(options.pop("log_level"))
    _run(_serve(target, host, port, workers, max_body_size, **options))


@cli.command()
@_common
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Worker processes to run.")
def worker(target: str, workers: int, **options: Any) -> None:
    """Run worker processes only (for instance on another machine) for TARGET."""
    _setup_logging(options.pop("log_level"))
    _run(_workers_only(target, workers, **options))


@cli.command("run-worker", hidden=True)
@_common
def run_worker(target: str, **options: Any) -> None:
    """One worker in this process (what the supervisor starts)."""
    _setup_logging(options.pop("log_level"))
    from .worker import run_worker_process

    broker = options.pop("broker")
    sys.exit(_run(run_worker_process(target, broker, **options)))


def _open_queue(broker: str, retention: float | None) -> Any:
    from .queue import Queue

    try:
        return Queue.from_url(broker, **({"retention": retention} if retention is not None else {}))
    except (ValueError, ImportError) as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from None


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


async def _serve(
    target: str,
    host: str,
    port: int,
    workers: int | None,
    max_body_size: int,
    *,
    call_timeout: float,
    broker: str,
    concurrency: int,
    lease: float,
    grace: float,
    retention: float | None,
) -> None:
    import uvicorn

    from .server import create_app
    from .service import load_service
    from .supervisor import Supervisor

    service = load_service(target)
    count = service.workers if workers is None else workers
    queue = _open_queue(broker, retention)  # connected by the app's lifespan
    supervisor = None
    if count:
        supervisor = Supervisor(
            target, broker, queue, workers=count, concurrency=concurrency, lease=lease, grace=grace, retention=retention
        )
    app = create_app(
        service,
        queue,
        max_body_size=max_body_size,
        worker_pids=supervisor.pids if supervisor else None,
        call_timeout=call_timeout,
    )

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            yield  # we handle signals ourselves, to drain the workers too

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", access_log=False))
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        server.should_exit = True
        if signals == 1:
            logger.info("shutting down: draining workers (Ctrl-C again to force)")
        else:
            server.force_exit = True
            if supervisor is not None:
                asyncio.get_running_loop().create_task(supervisor.stop(force=True))

    with _signals(on_signal):
        logger.info(
            "serving %s at http://%s:%d | broker %s | %d worker process(es) x concurrency %d",
            service.name,
            host,
            port,
            queue.describe(),
            count,
            concurrency,
        )
        if supervisor is not None:
            await supervisor.start()
        try:
            await server.serve()
        finally:
            if supervisor is not None:
                await supervisor.stop(force=signals > 1)
    logger.info("stopped")


async def _workers_only(
    target: str, workers: int, *, broker: str, concurrency: int, lease: float, grace: float, retention: float | None
) -> None:
    from .service import load_service
    from .supervisor import Supervisor

    service = load_service(target)  # fail here, clearly, rather than in every child
    queue = _open_queue(broker, retention)
    await _connect(queue)
    supervisor = Supervisor(
        target, broker, queue, workers=workers, concurrency=concurrency, lease=lease, grace=grace, retention=retention
    )
    stop = asyncio.Event()
    with _signals(stop.set):
        logger.info(
            "running %d worker process(es) x concurrency %d for %s | broker %s",
            workers,
            concurrency,
            service.name,
            queue.describe(),
        )
        await supervisor.start()
        await stop.wait()
        logger.info("shutting down: draining workers")
        await supervisor.stop()
    await queue.close()


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli()
