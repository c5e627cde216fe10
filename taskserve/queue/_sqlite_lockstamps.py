"""Lock stamps: when each worker process took SQLite's write lock, where its supervisor can see it.

One process holds the write lock of a SQLite store at a time, for the length of a transaction
(microseconds to milliseconds). A worker stopped inside one (SIGSTOP, a debugger, a frozen VM
page, a C call that never returns holding the GIL) holds it for ever: every other process's
writes wait, and no lease can recover that, as nothing is ever written. Only the process that
started the worker can end it, so each worker stamps, in a small file its supervisor mapped,
the monotonic time at which each of its connections took the lock (0 when it let it go), and
the supervisor kills a worker whose stamp is older than ``--lock-timeout``.

The file holds ``FIELDS`` doubles per worker slot: one per connection of ``SQLiteQueue`` that
writes (the loop's inline one, the writer thread's). A stamp is one aligned 8-byte store into
shared memory: no system call on the write path. CLOCK_MONOTONIC is the same clock in every
process of the machine, so the supervisor compares it with its own.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import time

logger = logging.getLogger("taskserve.queue")

ENV = "TASKSERVE_LOCK_STAMPS"  # set by the supervisor for each worker: "<file>:<slot>"
FIELDS = 2
INLINE, WRITER = range(FIELDS)
_DOUBLE = struct.Struct("d")
_SLOT = struct.Struct(f"{FIELDS}d")


class Stamp:
    """One connection's field: ``begin()`` once it holds the write lock, ``end()`` once it let go."""

    __slots__ = ("_map", "_offset")

    def __init__(self, shared: mmap.mmap | None, offset: int) -> None:
        self._map = shared
        self._offset = offset

    def begin(self) -> None:
        if self._map is not None:
            _DOUBLE.pack_into(self._map, self._offset, time.monotonic())

    def end(self) -> None:
        if self._map is not None:
            _DOUBLE.pack_into(self._map, self._offset, 0.0)


NO_STAMP = Stamp(None, 0)


def from_env() -> tuple[Stamp, ...]:
    """This process's stamps, one per field; no-ops unless a supervisor asked for them."""
    value = os.environ.get(ENV)
    if not value:
        return (NO_STAMP,) * FIELDS
    path, _, slot = value.rpartition(":")
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            shared = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        base = int(slot) * _SLOT.size
        if base + _SLOT.size > len(shared):
            raise ValueError(f"slot {slot} is beyond the file's end")
    except (OSError, ValueError) as exc:
        # The supervisor's watch over this worker is lost, not the worker: serve anyway.
        logger.warning(
            "cannot use the lock stamps at %r (%s); the supervisor cannot watch this worker's lock", value, exc
        )
        return (NO_STAMP,) * FIELDS
    return tuple(Stamp(shared, base + i * _DOUBLE.size) for i in range(FIELDS))


class StampBoard:
    """The supervisor's side: a file of ``slots`` workers' stamps in ``directory``, mapped."""

    def __init__(self, directory: str, slots: int) -> None:
        self.path = os.path.join(directory, "lock-stamps")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, max(1, slots) * _SLOT.size)
            self._map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self.slots = slots

    def env(self, slot: int) -> str:
        """The value of ``ENV`` for the worker of ``slot``."""
        return f"{self.path}:{slot}"

    def reset(self, slot: int) -> None:
        """Before a worker starts in ``slot``: its predecessor may have died holding the lock."""
        _SLOT.pack_into(self._map, slot * _SLOT.size, *([0.0] * FIELDS))

    def held_for(self, slot: int, now: float | None = None) -> float:
        """Seconds the worker of ``slot`` has held the write lock (0.0 when it holds none)."""
        stamps: list[float] = [s for s in _SLOT.unpack_from(self._map, slot * _SLOT.size) if s > 0]
        if not stamps:
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - min(stamps))

    def close(self) -> None:
        with contextlib.suppress(ValueError, BufferError):
            self._map.close()
