"""Each task run appends one line to the file named by BENCH_EXEC_LOG, whatever system runs it.

The bench reads it back to count runs per task (nothing may run twice) and, for `sleep`, to
know exactly how many ran at once. One unbuffered O_APPEND write per run: a few microseconds,
the same in every system, and nothing is lost if a worker is killed.
"""

from __future__ import annotations

import os
import time

_fd: int | None = None
_pid: int | None = None


def record(kind: str, *values: object) -> None:
    global _fd, _pid
    path = os.environ.get("BENCH_EXEC_LOG")
    if not path:
        return
    if _fd is None or _pid != os.getpid():  # a forked child opens its own descriptor
        _fd, _pid = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), os.getpid()
    os.write(_fd, (" ".join([kind, *map(str, values)]) + "\n").encode())


def now() -> float:
    return time.time()
