"""The reporter of one running task: progress and streamed output, coalesced into few writes.

``taskserve.progress()`` and each item a generator task yields land here, from the worker's
loop or from the task's thread. Nothing is written on the caller's time: the values wait
here, and one write every ``INTERVAL`` seconds carries the latest progress and every output
item since the last write, fenced by the claim's token (a worker that lost the task writes
nothing). ``close()`` writes what is left before the worker reports the outcome, so the last
progress and every output item are stored before the task's end is.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from typing import Any

from .._types import Claim
from ..codec import dump_item
from ..exceptions import QueueUnavailable
from ..queue.base import Queue

logger = logging.getLogger("taskserve.worker")

INTERVAL = 0.1  # seconds between two writes of one task's reports
PREVIEW_SIDE = 1024  # a preview larger than this on a side is scaled down before it is stored


class Reporter:
    def __init__(self, claim: Claim, queue: Queue, loop: asyncio.AbstractEventLoop) -> None:
        self.claim = claim
        self.queue = queue
        self.loop = loop
        self._lock = threading.Lock()
        self._progress: dict[str, Any] | None = None
        self._preview: Any = None
        self._outputs: list[tuple[int, bytes]] = []
        self._count = 0  # output items so far, numbered from 1
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None
        self._closed = False
        self.outputs = 0  # items stored so far, for the executor's result

    # -- from the task (any thread) --------------------------------------------------------

    def progress(self, fraction: float | None, message: str | None, preview: Any) -> None:
        with self._lock:
            last = self._progress or self._last_progress()
            self._progress = {
                "fraction": fraction if fraction is not None else last.get("fraction"),
                "message": message if message is not None else last.get("message"),
                "at": time.time(),
                "preview": last.get("preview"),
            }
            if preview is not None:
                self._preview = preview
        self._kick()

    def output(self, item: Any) -> bytes:
        data = dump_item(item)
        with self._lock:
            self._count += 1
            self._outputs.append((self._count, data))
        self._kick()
        return data

    @property
    def idle(self) -> bool:
        """Nothing was ever reported, or all of it is written: closing has nothing to do."""
        return self._timer is None and self._writing is None and not self._pending()

    def _pending(self) -> bool:
        with self._lock:
            return self._progress is not None or self._preview is not None or bool(self._outputs)

    # -- on the worker's loop ----------------------------------------------------------------

    def _last_progress(self) -> dict[str, Any]:
        return getattr(self, "_written", None) or {}

    def _kick(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._schedule()
        else:
            self.loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        if self._timer is None and self._writing is None and not self._closed:
            self._timer = self.loop.call_later(INTERVAL, self._start_write)

    def _start_write(self) -> None:
        self._timer = None
        self._writing = self.loop.create_task(self._write())
        self._writing.add_done_callback(self._written_done)

    def _written_done(self, task: asyncio.Task[None]) -> None:
        self._writing = None
        with self._lock:
            more = self._progress is not None or bool(self._outputs) or self._preview is not None
        if more and not self._closed:
            self._schedule()

    async def _write(self) -> None:
        with self._lock:
            progress, preview, outputs = self._progress, self._preview, self._outputs
            self._progress, self._preview, self._outputs = None, None, []
        if progress is None and preview is None and not outputs:
            return
        image = None
        if preview is not None:
            image = await self.loop.run_in_executor(None, _encode_preview, preview)
            progress = dict(progress or self._last_progress() or {"fraction": None, "message": None})
            progress["at"] = progress.get("at") or time.time()
            if image is not None:
                progress["preview"] = f"{self.claim.route}/preview?task_id={self.claim.id}"
        if progress is not None:
            self._written = progress
        try:
            await self.queue.report(
                self.claim.id,
                self.claim.token,
                progress=None if progress is None else json.dumps(progress),
                preview=image,
                outputs=outputs,
            )
            self.outputs = max(self.outputs, outputs[-1][0] if outputs else 0)
        except QueueUnavailable as exc:
            # Progress is a view, not the result: lose this write, keep the task running. Output
            # items are put back so that the next write (or close) carries them.
            logger.warning("task %s: could not store its progress (%s)", self.claim.id, exc)
            with self._lock:
                self._outputs[:0] = outputs

    async def close(self) -> None:
        """Write what is left; called before the task's outcome is reported."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
        for _ in range(3):  # a write that failed put its items back
            with self._lock:
                left = self._progress is not None or self._preview is not None or bool(self._outputs)
            if not left:
                return
            await self._write()


def _encode_preview(image: Any) -> tuple[bytes, str] | None:
    """A preview image as JPEG (PNG where it has transparency), at most PREVIEW_SIDE on a side."""
    if not hasattr(image, "save") or not hasattr(image, "mode"):
        logger.warning("a progress preview must be a PIL image; got %s", type(image).__name__)
        return None
    try:
        if max(image.size) > PREVIEW_SIDE:
            image = image.copy()
            image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        buf = io.BytesIO()
        if image.mode in ("RGBA", "LA", "P"):
            image.save(buf, format="PNG")
            return buf.getvalue(), "image/png"
        image.convert("RGB").save(buf, format="JPEG", quality=85)
        return buf.getvalue(), "image/jpeg"
    except Exception as exc:  # a preview must never fail the task
        logger.warning("could not encode a progress preview: %s", exc)
        return None


class FanOut:
    """The reporter of a batched call: its progress is the progress of every task in the batch."""

    def __init__(self, reporters: list[Reporter]) -> None:
        self.reporters = reporters

    def progress(self, fraction: float | None, message: str | None, preview: Any) -> None:
        for reporter in self.reporters:
            reporter.progress(fraction, message, preview)

    def output(self, item: Any) -> bytes:
        raise TypeError("A batchable task cannot stream output items.")
