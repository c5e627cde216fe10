"""Batchable tasks: several claimed tasks answered by one call of the model.

Each task carries one or more items (a list, or an array with the batch on axis 0). The
items of the claimed tasks are joined in claim order into calls of at most
``max_batch_size`` items (a task bigger than that is a call of its own), and each task gets
its own slice of the output. An ``Exception`` in the output fails only the task that owns
that item. A call that raises is run again task by task, so one poisoned input fails only
its own task. A task stopped while its batch runs (cancelled, lease lost) only has its
slice thrown away: the call is never interrupted for the others' sake.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..exceptions import TaskserveError
from .execute import Running

Result = Any  # (body, content_type), or the exception that ends the task


class BatchSizeMismatch(TaskserveError, ValueError):
    pass


def _is_array(value: Any) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ == "ndarray"


def _join(parts: Sequence[Any]) -> Any:
    if parts and all(_is_array(p) for p in parts):
        import numpy as np

        return np.concatenate(parts, axis=0)
    return list(itertools.chain.from_iterable(parts))


def _groups(runnings: list[Running], sizes: dict[int, int], limit: int) -> list[list[int]]:
    """Indexes of the tasks of each call, in claim order, at most ``limit`` items a call."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in range(len(runnings)):
        if i not in sizes:
            continue
        n = sizes[i]
        if current and total + n > limit:
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    if current:
        groups.append(current)
    return groups


class Batch:
    """One batch of claimed tasks of a batchable endpoint, run by ``Executor.run_batch``."""

    def __init__(self, runnings: list[Running], instance: Any, workdir: str) -> None:
        self.runnings = runnings
        self.endpoint = runnings[0].endpoint
        self.instance = instance
        self.workdir = workdir
        self.results: list[Result] = [None] * len(runnings)
        self.items: dict[int, Any] = {}

    # -- steps that may block: run in a thread ---------------------------------------------

    def decode(self) -> None:
        codec, param = self.endpoint.codec, self.endpoint.batch_param
        for i, running in enumerate(self.runnings):
            try:
                kwargs = codec.load(running.claim.args, os.path.join(self.workdir, running.claim.id))
                items = kwargs[param]
                if items is None or len(items) == 0:
                    raise ValueError(f"{param!r} holds no items; a batchable task needs at least one")
                self.items[i] = items
            except Exception as exc:
                self.results[i] = exc

    def split(self, group: list[int], output: Any) -> None:
        """Give each task of the call its slice of ``output``, encoded; an Exception item fails its task."""
        sizes = [len(self.items[i]) for i in group]
        if output is None or not hasattr(output, "__len__") or len(output) != sum(sizes):
            got = "no sequence" if output is None or not hasattr(output, "__len__") else f"{len(output)} items"
            raise BatchSizeMismatch(
                f"{self.endpoint.name} returned {got} for {sum(sizes)} inputs; a batchable function returns "
                "one output per input, in order."
            )
        start = 0
        for i, n in zip(group, sizes, strict=True):
            part = output[start : start + n]
            start += n
            failed = next((x for x in part if isinstance(x, BaseException)), None) if not _is_array(part) else None
            if failed is not None:
                self.results[i] = failed
                continue
            try:
                self.results[i] = self.endpoint.codec.dump_result(list(part) if isinstance(part, tuple) else part)
            except Exception as exc:
                self.results[i] = exc

    # -- the calls -------------------------------------------------------------------------

    def plan(self) -> list[list[int]]:
        sizes = {i: len(items) for i, items in self.items.items()}
        return _groups(self.runnings, sizes, self.endpoint.max_batch_size)

    def _mark_started(self, group: list[int], size: int) -> None:
        now = time.time()
        for i in group:
            self.runnings[i].started_at = now
            self.runnings[i].batch_size = size

    def run_sync(self) -> list[Result]:
        """Everything in the calling thread: decode, the calls, the re-runs, encode."""
        self.decode()
        for group in self.plan():
            self._call_group(group, lambda items: self.endpoint.fn(self.instance, items))
        return self.results

    def _call_group(self, group: list[int], call: Callable[[Any], Any]) -> None:
        if all(self.runnings[i].stop_reason is not None for i in group):
            return
        joined = _join([self.items[i] for i in group])
        self._mark_started(group, len(joined))
        try:
            self.split(group, call(joined))
            return
        except Exception as exc:
            if len(group) == 1:
                self.results[group[0]] = exc
                return
        for i in group:  # the call failed: each task alone, so a bad input fails only its own
            if self.runnings[i].stop_reason is not None:
                continue
            self._mark_started([i], len(self.items[i]))
            try:
                self.split([i], call(self.items[i]))
            except Exception as exc:
                self.results[i] = exc

    async def run_async(self, to_thread: Callable[..., Awaitable[Any]]) -> list[Result]:
        """An ``async def`` batchable function: decode and encode in a thread, the calls on the loop."""
        await to_thread(self.decode)
        for group in self.plan():
            if all(self.runnings[i].stop_reason is not None for i in group):
                continue
            joined = _join([self.items[i] for i in group])
            self._mark_started(group, len(joined))
            try:
                output = await self.endpoint.fn(self.instance, joined)
                await to_thread(self.split, group, output)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if len(group) == 1:
                    self.results[group[0]] = exc
                    continue
            for i in group:
                if self.runnings[i].stop_reason is not None:
                    continue
                self._mark_started([i], len(self.items[i]))
                try:
                    await to_thread(self.split, [i], await self.endpoint.fn(self.instance, self.items[i]))
                except Exception as exc:
                    self.results[i] = exc
        return self.results
