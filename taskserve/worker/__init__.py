"""Worker processes: claim tasks from the queue and run them.

``core`` holds the Worker (claiming, running, leases, cancel); ``process`` is the body of one
worker process started by the supervisor or ``taskserve worker``.
"""

from __future__ import annotations

from .core import EXIT_RECYCLE, Worker
from .process import run_worker_process

__all__ = ["EXIT_RECYCLE", "Worker", "run_worker_process"]
