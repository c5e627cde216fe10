"""Free disk space, for ``/readyz``: on a full disk every write fails, so the server is not ready.

SQLite answers a full disk with an error on each write (and a checkpoint that cannot grow the
file); workers cannot write the uploads they run on. A load balancer should stop sending
submits before that, while reads still work: ``/readyz`` answers 503 once a directory the
store or the workers write to has less than ``--min-free-disk`` free. ``statvfs`` is cheap,
but a readiness probe may come many times a second: each answer is reused for ``TTL`` seconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

from .. import _runtime

TTL = 1.0
DEFAULT_MIN_FREE = 100_000_000  # bytes: 100 MB


def human(n: int) -> str:
    """Bytes the way ``--min-free-disk`` takes them: 1.5 GB, 120 MB, 900 kB."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class DiskCheck:
    """Which of ``dirs`` (path, what it holds) have less than ``min_free`` bytes free."""

    def __init__(self, dirs: list[tuple[str, str]], min_free: int) -> None:
        self.min_free = min_free
        self.dirs = dirs
        self._checked = -TTL
        self._short: list[dict[str, Any]] = []

    @classmethod
    def for_store(cls, store_dirs: list[tuple[str, str]], min_free: int) -> DiskCheck:
        """The store's own directories, where workers write uploads, and the temp directory."""
        dirs = [*store_dirs, (_runtime.base_dir(), "the runtime directory (uploads being run)")]
        dirs.append((tempfile.gettempdir(), "the temp directory"))
        return cls(dirs, min_free)

    def short(self) -> list[dict[str, Any]]:
        """The directories short of space: ``path``, ``what``, ``free_bytes``; cached ``TTL`` seconds."""
        if self.min_free <= 0:
            return []
        if time.monotonic() - self._checked < TTL:
            return self._short
        short, seen = [], set()
        for path, what in self.dirs:
            try:
                device = os.stat(path).st_dev
                free = shutil.disk_usage(path).free
            except OSError:
                continue  # not there (yet): nothing written to it can fail for want of space
            if device in seen:
                continue  # one file system, one answer
            seen.add(device)
            if free < self.min_free:
                short.append({"path": path, "what": what, "free_bytes": free})
        self._short, self._checked = short, time.monotonic()
        return short

    def message(self, short: list[dict[str, Any]]) -> str:
        where = "; ".join(f"{human(d['free_bytes'])} free at {d['path']} ({d['what']})" for d in short)
        return (
            f"The disk is (nearly) full: {where}, under the --min-free-disk bound of {human(self.min_free)}. "
            "Writes would fail: free some space (or lower --min-free-disk)."
        )
