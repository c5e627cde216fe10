"""A service for the process-hardening tests: uploads that take a while, a worker that freezes."""

from __future__ import annotations

import asyncio
import gc
import os
import pathlib
import signal
import sqlite3
import threading
import time

import taskserve
from taskserve.queue.sqlite import SQLiteQueue


def _once(marker: str) -> bool:
    """True the first time ``marker`` is seen (it is created then), False on a re-run."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


@taskserve.service(name="procs")
class Procs:
    @taskserve.task
    def hold_upload(self, upload: pathlib.Path, seconds: float, marker: str = "") -> int:
        """Sleeps ``seconds`` on its first run (``marker`` records it), holding the upload on disk."""
        if marker and _once(marker):
            time.sleep(seconds)
        return upload.stat().st_size

    @taskserve.task
    def echo(self, text: str) -> str:
        return text

    @taskserve.task
    async def freeze_in_write(self, marker: str) -> str:
        """On its first run, stops its own worker process (SIGSTOP) inside a write transaction.

        It goes through the worker's own queue connection, as the worker's writes do, so the
        store's write lock is held by a process that will never release it on its own.
        """
        if not _once(marker):
            return "rerun"
        queue = next(o for o in gc.get_objects() if isinstance(o, SQLiteQueue))

        def freeze(conn: sqlite3.Connection) -> None:
            # Sent to this thread, so that it stops itself at once: sent to the process, the
            # signal may go to another thread, and this one could commit before the stop.
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)

        await queue._write(freeze)
        await asyncio.sleep(0)
        return "thawed"
