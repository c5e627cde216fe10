"""``taskserve.progress()``: what a running task tells the people waiting on it.

A diffusion model takes seconds to minutes; its users want "step 12/30" and a preview rather
than a spinner. The worker gives each running task a reporter (a context variable, carried
into the thread of a sync task); ``progress()`` hands it the latest values and returns at
once. The reporter writes to the store at most a few times a second, so a task may call this
in its innermost loop, and writes the last call before the task's end is recorded.
"""

from __future__ import annotations

import contextvars
import math
from typing import Any, Protocol

MAX_MESSAGE = 1000  # characters of a progress message kept


class _Reporter(Protocol):
    def progress(self, fraction: float | None, message: str | None, preview: Any) -> None: ...

    def output(self, item: Any) -> bytes: ...


current: contextvars.ContextVar[_Reporter | None] = contextvars.ContextVar("taskserve_reporter", default=None)


def progress(fraction: float | None = None, message: str | None = None, *, preview: Any = None) -> None:
    """Report how far the running task is: ``fraction`` in [0, 1], a ``message``, a ``preview`` image.

    Shown in the task's status as ``progress`` and streamed as ``progress`` events; the preview
    (a PIL image) is served at ``GET /{route}/preview?task_id=ID``. Each argument left out keeps
    its last value.

    Raises:
        RuntimeError: called outside a task run by a taskserve worker.
        ValueError: a fraction outside [0, 1].

    Example:
        >>> for step in range(30):
        ...     latents = denoise(latents)
        ...     taskserve.progress((step + 1) / 30, f"step {step + 1}/30")
    """
    reporter = current.get()
    if reporter is None:
        raise RuntimeError(
            "taskserve.progress() reports on the running task, so it works only inside a task method "
            "run by a taskserve worker (sync or async); outside one there is nothing to report on."
        )
    if fraction is not None:
        fraction = float(fraction)
        if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
            raise ValueError(f"progress fraction must be between 0 and 1, got {fraction!r}.")
    if message is not None:
        message = str(message)[:MAX_MESSAGE]
    reporter.progress(fraction, message, preview)
