"""What keeps a worker's claims and presence alive: lease renewal, heartbeats and cancel checks.

These loops run on the worker's event loop until the worker has drained and reported, not
just until it stops claiming: a drain longer than the lease must keep renewing, or the
task would be re-queued under its own worker and its result fenced out. A failure of one
round is logged and the loop goes on; a loop that silently ended would let every lease lapse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from .._aio import cancel_and_wait, wait_event
from .._types import WorkerInfo

if TYPE_CHECKING:
    from .core import Worker

logger = logging.getLogger("taskserve.worker")

HEARTBEAT = 2.0  # seconds between two heartbeats
HEARTBEAT_TTL = 7.0  # a worker silent this long is taken for dead by /readyz and the registry


class Keeper:
    """Renews the leases of one worker's claims and reports the worker to the store."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._tasks: list[asyncio.Task[None]] = []
        self._beat_now = asyncio.Event()

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._renew_loop()), asyncio.create_task(self._heartbeat_loop())]

    def beat_soon(self) -> None:
        """Send a heartbeat now (the worker's state changed)."""
        self._beat_now.set()

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)  # _aio: a cancel landing as a heartbeat wakes is not lost
        for task in self._tasks:
            if not task.cancelled() and task.exception() is not None:
                logger.warning("worker %s: %s ended with %r", self.worker.name, task.get_name(), task.exception())
        self._tasks = []
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.worker.queue.forget_worker(self.worker.name), 1.0)

    # -- leases ----------------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        interval = max(self.worker.lease / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew()
            except Exception as exc:
                logger.warning("worker %s could not renew leases: %s", self.worker.name, exc)

    async def renew(self) -> None:
        worker = self.worker
        held = worker.held()
        if not held:
            return
        since = time.monotonic()
        kept = await worker.queue.extend(held, worker.lease)
        worker.buffer.renewed(kept, since)
        lost = held.keys() - kept
        if lost:
            worker.drop_buffered(lost)
            for task_id in lost:
                worker.stop_task(task_id, "lost")

    async def check_cancelled(self, task_id: str) -> None:
        """A wake-up said ``task_id`` was cancelled: stop it if the store agrees it is no longer ours."""
        token = self.worker.held().get(task_id)
        if token is None:
            return
        try:
            still = await self.worker.queue.still_held({task_id: token})
        except Exception as exc:
            logger.warning("worker %s could not check a cancel of %s: %s", self.worker.name, task_id, exc)
            return
        if task_id not in still:
            logger.info("task %s cancelled; stopping it", task_id)
            self.worker.drop_buffered({task_id})
            self.worker.stop_task(task_id, "cancelled")

    # -- heartbeats ------------------------------------------------------------------------

    def info(self) -> WorkerInfo:
        worker = self.worker
        return WorkerInfo(
            id=worker.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            routes=list(worker.routes),
            concurrency=worker.concurrency,
            started_at=worker.started_at,
            state=worker.state,
            running=worker.running_ids(),
            gpus=[g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g],
            done=worker.completed,
            failed=worker.failed,
        )

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.worker.queue.heartbeat(self.info(), HEARTBEAT_TTL)
            except Exception as exc:
                logger.debug("worker %s could not send a heartbeat: %s", self.worker.name, exc)
            await wait_event(self._beat_now, HEARTBEAT)
            self._beat_now.clear()
