"""The body of one worker process: signals, the supervisor watch, maintenance and exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from ..exceptions import QueueUnavailable
from ..queue.base import Queue
from .core import EXIT_RECYCLE, Worker

logger = logging.getLogger("taskserve.worker")


async def run_worker_process(
    target: str, broker: str, *, concurrency: int, lease: float, grace: float, retention: float | None
) -> int:
    """The body of one worker process: serve until SIGTERM/SIGINT or orphaned; returns the exit code."""
    from ..service import load_service

    service = load_service(target)
    options: dict[str, Any] = {}
    if retention is not None:
        options["retention"] = retention
    queue = Queue.from_url(broker, **options)
    worker = Worker(service, queue, concurrency=concurrency, lease=lease, grace=grace)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    parent = os.getppid()

    async def watch_parent() -> None:
        # Started by a supervisor that was killed (kill -9): drain and go, don't linger.
        while True:
            await asyncio.sleep(0.5)
            if os.getppid() != parent:
                logger.warning("worker %s lost its supervisor; stopping", worker.name)
                worker.grace = 0
                worker.stop()
                return

    watcher = asyncio.create_task(watch_parent()) if os.environ.get("TASKSERVE_SUPERVISED") else None

    async def maintain() -> None:
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(QueueUnavailable):
                await queue.recover()

    maintainer = asyncio.create_task(maintain())
    try:
        await worker.run()
    finally:
        for t in (watcher, maintainer):
            if t is not None:
                t.cancel()
        await queue.close()
    return EXIT_RECYCLE if worker.recycle else 0
