"""Services the tests serve. Module level, so worker processes can import them."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import time
from collections.abc import AsyncIterator, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from pydantic import BaseModel

import taskserve


class Point(BaseModel):
    x: float
    y: float


def _touch(path: str | None, text: str = "") -> None:
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


@taskserve.service(name="testsvc")
class TestService:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.built_at = time.time()

    @taskserve.task
    def echo(self, text: str) -> str:
        return text

    @taskserve.task
    def add(self, a: int, b: int = 1) -> int:
        return a + b

    @taskserve.task
    def record(self, x: int, log: str) -> int:
        """Appends x to ``log``, so a test can count how many times each task ran."""
        _touch(log, str(x))
        return x * 2

    @taskserve.task
    def fail(self, message: str) -> str:
        raise ValueError(message)

    @taskserve.task
    async def slow_async(self, seconds: float, marker: str | None = None) -> str:
        _touch(marker, "started")
        await asyncio.sleep(seconds)
        _touch(marker, "finished")
        return "slept"

    @taskserve.task
    def slow_sync(self, seconds: float, marker: str | None = None) -> dict[str, int]:
        _touch(marker, "started")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.01)
        _touch(marker, "finished")
        return {"pid": os.getpid()}

    @taskserve.task(timeout=0.5, max_attempts=1)
    async def too_slow(self) -> str:
        await asyncio.sleep(30)
        return "never"

    @taskserve.task
    def image(self, prompt: str, size: int = 64) -> Image.Image:
        img = Image.new("RGB", (size, size), (len(prompt) * 10 % 256, 80, 160))
        ImageDraw.Draw(img).ellipse((4, 4, size - 4, size - 4), fill=(250, 250, 0))
        return img

    @taskserve.task
    def invert(self, img: Image.Image) -> Image.Image:
        return ImageOps.invert(img.convert("RGB"))

    @taskserve.task
    def file_info(self, upload: pathlib.Path) -> dict[str, object]:
        return {"name": upload.name, "size": upload.stat().st_size, "head": upload.read_bytes()[:5].decode()}

    @taskserve.task
    def checksum(self, upload: pathlib.Path | None = None, data: bytes | None = None) -> dict[str, object]:
        digest = hashlib.sha256(upload.read_bytes() if upload is not None else data or b"").hexdigest()
        return {"sha256": digest, "name": upload.name if upload is not None else None}

    @taskserve.task
    def reverse_bytes(self, data: bytes) -> bytes:
        return data[::-1]

    @taskserve.task
    def transpose(self, matrix: np.ndarray) -> np.ndarray:
        return matrix.T

    @taskserve.task
    def midpoint(self, a: Point, b: Point) -> Point:
        return Point(x=(a.x + b.x) / 2, y=(a.y + b.y) / 2)

    @taskserve.task
    def whoami(self) -> dict[str, float]:
        return {"pid": self.pid, "built_at": self.built_at}

    @taskserve.api
    def describe(self, text: str) -> dict[str, object]:
        return {"text": text, "length": len(text)}

    @taskserve.task(timeout=2, max_attempts=1)
    def stuck_in_c(self, seconds: float = 100) -> str:
        """Blocks in C code (``time.sleep``), which no exception raised into its thread can stop."""
        time.sleep(seconds)
        return "woke up"

    @taskserve.task
    def halve(self, x: float, weights: dict[str, float] | None = None) -> float:
        return x / 2

    @taskserve.task
    def depth(self, value: object) -> int:
        """How deeply ``value`` nests lists and dicts (a scalar is 0)."""
        level = 0
        while isinstance(value, (list, dict)) and value:
            value = value[0] if isinstance(value, list) else next(iter(value.values()))
            level += 1
        return level

    @taskserve.task
    def scale(self, values: np.typing.NDArray[np.float32], factor: float = 2.0) -> np.typing.NDArray[np.float32]:
        return values * np.float32(factor)

    @taskserve.task
    def array_info(self, arr: np.ndarray) -> dict[str, object]:
        """What the worker received: a test compares it with what the client sent."""
        return {"dtype": str(arr.dtype), "shape": list(arr.shape), "writeable": bool(arr.flags.writeable)}

    @taskserve.task(max_attempts=3, retry_on=(ConnectionError,), retry_delay=0.2, retry_backoff=2.0)
    def flaky_connection(self, log: str, failures: int) -> int:
        """Raises ConnectionError, listed in its ``retry_on``, on its first ``failures`` runs (counted in ``log``)."""
        _touch(log, "run")
        runs = pathlib.Path(log).read_text().split().count("run")
        if runs <= failures:
            raise ConnectionError(f"run {runs} failed")
        return runs

    @taskserve.task(concurrency=2)
    async def capped(self, seconds: float) -> str:
        """At most two run at once, over every worker: a test reads their start and end times."""
        await asyncio.sleep(seconds)
        return "done"

    @taskserve.task(max_queue=3)
    async def bounded(self, seconds: float = 0.0) -> str:
        """A route whose queue holds at most three pending tasks."""
        await asyncio.sleep(seconds)
        return "done"

    @taskserve.task
    def steps(self, n: int, pause: float = 0.02) -> str:
        """Reports progress at every step, a preview image every fifth."""
        for i in range(n):
            preview = Image.new("RGB", (16, 16), (i * 10 % 256, 0, 0)) if i % 5 == 0 else None
            taskserve.progress((i + 1) / n, f"step {i + 1}/{n}", preview=preview)
            time.sleep(pause)
        return "done"

    @taskserve.task
    async def steps_async(self, n: int, pause: float = 0.02) -> str:
        for i in range(n):
            taskserve.progress((i + 1) / n, f"step {i + 1}/{n}")
            await asyncio.sleep(pause)
        return "done"

    @taskserve.task
    def tokens(self, n: int, pause: float = 0.0) -> Iterator[str]:
        """A generator task: each item streams as it is made."""
        for i in range(n):
            if pause:
                time.sleep(pause)
            yield f"t{i}"

    @taskserve.task
    async def tokens_async(self, n: int, pause: float = 0.0) -> AsyncIterator[dict[str, int]]:
        for i in range(n):
            if pause:
                await asyncio.sleep(pause)
            yield {"i": i}
