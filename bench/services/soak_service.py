"""The service the fault soak (`bench/soak.py`) serves: one task of each kind users write.

Every run appends to the file named by SOAK_RUN_LOG, one unbuffered O_APPEND write per
line, so that a kill -9 loses nothing already written and the soak can count, per input,
how many runs started and how many returned. Each input carries a unique ``key`` (one per
submit request), so a run is tied to exactly one submitted task.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import time

from PIL import Image

import taskserve

_fd: int | None = None
_pid: int | None = None


def record(event: str, kind: str, key: str) -> None:
    global _fd, _pid
    path = os.environ.get("SOAK_RUN_LOG")
    if not path:
        return
    if _fd is None or _pid != os.getpid():
        _fd, _pid = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), os.getpid()
    os.write(_fd, f"{event} {kind} {key} {os.getpid()} {time.time():.6f}\n".encode())


def colour(key: str) -> tuple[int, int, int]:
    """The colour of the picture for ``key``; the soak computes it too, to check results."""
    digest = hashlib.sha256(key.encode()).digest()
    return (digest[0], digest[1], digest[2])


class Flaky(Exception):
    """Raised by ``flaky`` on its first run; listed in its ``retry_on``."""


@taskserve.service(name="soak")
class SoakService:
    @taskserve.task(max_attempts=5)
    def quick(self, key: str, x: int) -> int:
        record("start", "quick", key)
        record("end", "quick", key)
        return x * x + len(key)

    @taskserve.task(max_attempts=5)
    def slow_sync(self, key: str, seconds: float) -> str:
        record("start", "slow_sync", key)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.02)
        record("end", "slow_sync", key)
        return f"sync:{key}"

    @taskserve.task(max_attempts=5)
    async def slow_async(self, key: str, seconds: float) -> str:
        record("start", "slow_async", key)
        await asyncio.sleep(seconds)
        record("end", "slow_async", key)
        return f"async:{key}"

    @taskserve.task(max_attempts=5)
    def failing(self, key: str) -> str:
        record("start", "failing", key)
        record("raise", "failing", key)
        raise ValueError(f"bad {key}")

    @taskserve.task(max_attempts=5, retry_on=(Flaky,))
    def flaky(self, key: str, marks: str) -> str:
        """Fails its first run (of this key) with ``Flaky``, which ``retry_on`` turns into a re-run."""
        record("start", "flaky", key)
        mark = pathlib.Path(marks) / key
        first = not mark.exists()
        mark.touch()
        if first:
            record("raise", "flaky", key)
            raise Flaky(f"first run of {key}")
        record("end", "flaky", key)
        return f"flaky:{key}"

    @taskserve.task(max_attempts=5)
    def picture(self, key: str, size: int) -> Image.Image:
        record("start", "picture", key)
        image = Image.new("RGB", (size, size), colour(key))
        record("end", "picture", key)
        return image

    @taskserve.task(max_attempts=5)
    def checksum(self, key: str, upload: pathlib.Path) -> str:
        record("start", "checksum", key)
        digest = hashlib.sha256(upload.read_bytes()).hexdigest()
        record("end", "checksum", key)
        return f"{key}:{digest}"
