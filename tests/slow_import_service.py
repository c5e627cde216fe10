"""A service whose import (``SLOW_IMPORT_SECONDS``) or construction (``SLOW_INIT_SECONDS``) takes
a while in worker processes, as a large model library's import and a model's loading do.

Each worker first appends its pid to the file ``SLOW_IMPORT_MARKER`` names, so a test knows
it is importing or loading. The API process (no supervisor in its environment) imports it at once.
"""

from __future__ import annotations

import os
import time

import taskserve


def _linger(variable: str) -> None:
    seconds = float(os.environ.get(variable, "0"))
    marker = os.environ.get("SLOW_IMPORT_MARKER")
    if seconds and marker:
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
    time.sleep(seconds)


if os.environ.get("TASKSERVE_SUPERVISOR_PID"):
    _linger("SLOW_IMPORT_SECONDS")


@taskserve.service(name="slowimport", workers=2)
class SlowImport:
    def __init__(self) -> None:
        _linger("SLOW_INIT_SECONDS")

    @taskserve.task
    def echo(self, text: str) -> str:
        return text
