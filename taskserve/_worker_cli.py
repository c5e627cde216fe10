"""Worker processes without the API: ``taskserve worker`` and the hidden ``run-worker``.

``worker`` runs a supervisor alone (for workers on another machine than the API);
``run-worker`` is the one worker in a process that every supervisor starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import Any

import click

from ._cli_common import (
    SHUTDOWN_REQUESTS,
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

logger = logging.getLogger("taskserve")


@click.command()
@common_options
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
@lock_timeout_option
@gpus_option
def worker(target: str, workers: int | None, metrics_port: int | None, metrics_host: str, **options: Any) -> None:
    """Run worker processes only (for instance on another machine) for TARGET."""
    setup_logging(options)
    check_runtime_dir(options["broker"])
    with worker_metrics_dir(options["broker"], metrics_port is not None) as metrics_dir:
        server = None if metrics_dir is None else _serve_metrics(metrics_host, metrics_port or 0, metrics_dir)
        try:
            run_loop(_workers_only(target, workers, metrics_dir=metrics_dir, **options))
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


@click.command("run-worker", hidden=True)
@common_options
def run_worker(target: str, **options: Any) -> None:
    """One worker in this process (what the supervisor starts)."""
    from .worker.process import WORKER_ID, ParentWatch, flush_logs, run_worker_process

    watch = ParentWatch.from_env()  # first: the supervisor may die while the service imports
    setup_logging(options)
    setup_tracing()
    broker = options.pop("broker")
    code = run_loop(run_worker_process(target, broker, name=os.environ.get(WORKER_ID), watch=watch, **options))
    if code:
        # Recycled: a task's thread is stuck (in C code, say). Its tasks are handed back; exiting
        # normally would wait for that thread for ever, holding the process and its GPU.
        flush_logs()
        os._exit(code)
    sys.exit(code)


async def _connect(queue: Any) -> None:
    from .exceptions import QueueUnavailable

    try:
        await queue.connect()
    except QueueUnavailable as exc:
        # Keep running: the API answers 503 and workers retry until the broker comes back.
        logger.warning("%s Carrying on; it will be retried.", exc)


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
    count, plan = worker_plan(service, workers, gpus)  # as `serve` does
    queue = open_queue(broker, retention)
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
    with stop_signals(stop.set):
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
