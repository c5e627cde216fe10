"""Running one claimed task: decode its arguments, call the function, encode the result.

The worker's event loop is its heartbeat: lease renewal, cancels, heartbeats and SIGTERM are
all served there, so nothing that can block runs on it. A sync function runs in a pool
thread together with the decoding of its arguments and the encoding of its result (one hop
there and back). An async function runs on the loop; its arguments and result are decoded
and encoded on the loop only when they are small JSON, which cannot take long, else in a
thread too.

Stopping a sync call: Python cannot kill a thread, so an exception is raised inside it
(which works while it runs Python code). ``SyncCall`` makes sure that exception can only
land inside the call's own frames, never in the pool's code after the call returned, where
it would kill the pool thread and leave the pool waiting on it for ever.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import logging
import os
import random
import shutil
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .._types import Claim, Outcome, TaskStatus, iso
from ..codec import BINARY_KINDS, dump_item
from ..exceptions import Retry
from ..queue.base import Queue
from ..reporting import current as reporting
from ..service import Endpoint
from .report import FanOut, Reporter

logger = logging.getLogger("taskserve.worker")

MAX_TRACEBACK = 16 * 1024  # characters of a failure's traceback kept with the attempt (its end, where it raised)
_TASKSERVE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_PATHS = sysconfig.get_paths()
_STDLIB_DIR = _PATHS["stdlib"] + os.sep
_PACKAGES_DIRS = (_PATHS["purelib"] + os.sep, _PATHS["platlib"] + os.sep)

INLINE_ARGS = 64 * 1024  # stored arguments up to this size, all JSON, are decoded on the loop
STOP_PATIENCE = 3.0  # seconds an interrupted sync call gets to stop before the process is recycled
SEQUENCE_BUDGET = 0.02  # seconds a sequence of quick sync tasks may take before it leaves the rest unstarted
UNSTARTED: Any = object()  # run_sequence's mark for a task it left for later


class TaskInterrupted(BaseException):
    """Raised inside a sync task's thread to stop it (cancelled, timed out or shutting down)."""


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else ctypes.c_void_p(0)
    )


@dataclass
class SyncCall:
    """One sync call in a pool thread, which the loop may interrupt while (and only while) it runs."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    thread_id: int | None = None
    finished: bool = False
    interrupted: bool = False

    def interrupt(self) -> bool:
        with self.lock:
            if self.finished or self.thread_id is None or self.interrupted:
                return False
            self.interrupted = True
            _set_async_exc(self.thread_id, TaskInterrupted)
            return True

    def run(self, fn: Callable[[], Any]) -> Any:
        with self.lock:
            self.thread_id = threading.get_ident()
        try:
            return fn()
        finally:
            with self.lock:
                self.finished = True
                if self.interrupted:
                    # An exception sent but not delivered yet would land in the pool's own
                    # code once we return: take it back while no new one can be sent.
                    _set_async_exc(self.thread_id, None)


@dataclass
class Running:
    claim: Claim
    endpoint: Endpoint
    in_sequence: bool = False  # runs with other quick tasks in one thread hop (Executor.run_sequence)
    task: asyncio.Task[None] = None  # type: ignore[assignment]  # set right after creation
    sync: SyncCall | None = None
    # Why we stop it: "cancelled" (by a user: drop the result), "lost" (the lease is gone),
    # "shutdown" (hand it back), "timeout".
    stop_reason: str | None = None
    started_at: float | None = None
    batch_size: int | None = None  # items in the call that ran it (batchable endpoints)
    # What its call in a sequence ended with, as soon as it ended: a drain that gives up on
    # the rest of a stuck sequence still reports the tasks that did run.
    ended: Any = None
    reporter: Reporter | None = None  # where taskserve.progress() and yielded items go

    @property
    def timeout(self) -> float | None:
        return self.claim.timeout if self.claim.timeout is not None else self.endpoint.timeout

    def limit(self) -> tuple[float | None, str]:
        """Seconds this attempt may run from now, and the stop reason when they run out.

        The task's deadline (``deadline=`` or ``Cancel-After``) bounds the attempt too: the
        store's sweep would stop it anyway, but only at its next pass.
        """
        timeout, deadline = self.timeout, self.claim.deadline
        if deadline is None:
            return timeout, "timeout"
        left = max(0.0, deadline - time.time())
        if timeout is None or left < timeout:
            return left, "deadline"
        return timeout, "timeout"


class Executor:
    """Runs claims: one ``Running`` each, to an ``Outcome`` (or None when the store decides)."""

    def __init__(self, concurrency: int, workdir: str, queue: Queue | None = None) -> None:
        # Two spare threads, so decoding for async tasks never waits behind a stuck sync call.
        self.pool = ThreadPoolExecutor(max_workers=concurrency + 2, thread_name_prefix="taskserve-task")
        self.workdir = workdir
        self.queue = queue  # where progress and streamed output go (None: taskserve.progress() is refused)
        self.instance: Any = None
        self.stuck = False  # a sync call did not stop when interrupted: the process must be recycled

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _reporter(self, running: Running) -> Reporter | None:
        if self.queue is None:
            return None
        running.reporter = Reporter(running.claim, self.queue, asyncio.get_running_loop())
        return running.reporter

    async def _close_reporters(self, runnings: list[Running]) -> None:
        """Store the last progress and output of each task before its outcome is reported."""
        busy = [r.reporter.close() for r in runnings if r.reporter is not None and not r.reporter.idle]
        if busy:
            await asyncio.gather(*busy, return_exceptions=True)

    async def run(self, running: Running) -> Outcome | None:
        claim, endpoint = running.claim, running.endpoint
        workdir = os.path.join(self.workdir, claim.id)
        self._reporter(running)
        try:
            if endpoint.is_async:
                body, content_type = await self._run_async(running, workdir)
            else:
                body, content_type = await self._run_sync(running, workdir)
            return self._outcome(running, TaskStatus.SUCCESS, result=body, content_type=content_type)
        except (asyncio.CancelledError, TaskInterrupted):
            return self._stopped(running)
        except Exception as exc:
            return self._failed(running, exc)
        finally:
            await self._close_reporters([running])
            if endpoint.codec.writes_files:
                shutil.rmtree(workdir, ignore_errors=True)

    def _failed(self, running: Running, exc: BaseException) -> Outcome:
        claim, endpoint = running.claim, running.endpoint
        if isinstance(exc, Retry):
            return self._outcome(
                running,
                TaskStatus.FAILURE,
                error_type="Retry",
                error_message=str(exc),
                retry=True,
                retry_delay=exc.delay,
            )
        # The traceback as exc_info: text logs print it below the line, JSON logs in its own field.
        logger.warning("task %s (%s) failed on attempt %d", claim.id, endpoint.name, claim.attempts, exc_info=exc)
        retry = bool(endpoint.retry_on) and isinstance(exc, endpoint.retry_on)
        return self._outcome(
            running,
            TaskStatus.FAILURE,
            error_type=type(exc).__name__,
            error_message=str(exc),
            traceback=format_traceback(exc),
            retry=retry,
            retry_delay=retry_delay(endpoint, claim.attempts) if retry else 0.0,
        )

    def _outcome(self, running: Running, status: TaskStatus, **fields: Any) -> Outcome:
        return Outcome(
            running.claim.id,
            running.claim.token,
            status,
            started_at=running.started_at,
            batch_size=running.batch_size,
            **fields,
        )

    def _stopped(self, running: Running) -> Outcome | None:
        if running.stop_reason == "timeout":
            message = f"{running.endpoint.name} ran longer than its timeout of {running.timeout}s"
            return self._outcome(running, TaskStatus.FAILURE, error_type="TimeoutError", error_message=message)
        if running.stop_reason == "deadline":
            message = f"{running.endpoint.name} did not finish by its deadline {iso(running.claim.deadline)}"
            return self._outcome(running, TaskStatus.FAILURE, error_type="DeadlineExceeded", error_message=message)
        if running.stop_reason == "shutdown":
            return Outcome(running.claim.id, running.claim.token, TaskStatus.PENDING)
        return None  # cancelled or lost: the store already says what happened

    # -- sync ------------------------------------------------------------------------------

    def _whole(self, running: Running, workdir: str) -> Callable[[], tuple[bytes, str]]:
        """Decode, call and encode: everything a sync task does, for one thread hop."""
        endpoint, claim, instance = running.endpoint, running.claim, self.instance

        def whole() -> tuple[bytes, str]:
            kwargs = endpoint.codec.load(claim.args, workdir)
            previous = reporting.set(running.reporter)
            try:
                running.started_at = time.time()
                value = endpoint.fn(instance, **kwargs)
                if endpoint.codec.streams:
                    return _stream(value, running.reporter)
            finally:
                reporting.reset(previous)
            return endpoint.codec.dump_result(value)

        return whole

    async def run_sequence(self, runnings: list[Running]) -> list[Outcome | None]:
        """Run quick sync tasks one after another in a single thread hop.

        A hop to a thread and back costs more than a call of a millisecond, so quick tasks
        claimed ahead go to the thread together. Each keeps its own outcome, and a stop of one
        (cancel, lost lease, shutdown) interrupts or skips only that one. Once the sequence has
        taken ``SEQUENCE_BUDGET`` seconds the rest are left unstarted (``UNSTARTED``), so a call
        that turns slow does not hold back tasks another worker could take.
        """
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        for running in runnings:
            self._reporter(running)

        def sequence() -> list[Any]:
            began, results = time.perf_counter(), list[Any]()
            for running in runnings:
                if running.stop_reason is not None:
                    results.append(TaskInterrupted())
                    continue
                if time.perf_counter() - began > SEQUENCE_BUDGET:
                    results.append(UNSTARTED)
                    continue
                workdir = os.path.join(self.workdir, running.claim.id)
                call = running.sync = SyncCall()
                try:
                    result = call.run(self._whole(running, workdir))
                except BaseException as exc:  # each task's own outcome, TaskInterrupted included
                    result = exc
                finally:
                    if running.endpoint.codec.writes_files:
                        shutil.rmtree(workdir, ignore_errors=True)
                running.ended = result
                results.append(result)
            return results

        try:
            results = await loop.run_in_executor(self.pool, context.run, sequence)
        finally:
            await self._close_reporters(runnings)
        return [
            UNSTARTED if result is UNSTARTED else self.settle(running, result)
            for running, result in zip(runnings, results, strict=True)
        ]

    async def run_batch(self, runnings: list[Running]) -> list[Outcome | None]:
        """Claimed tasks of a batchable endpoint: their items in as few calls as ``max_batch_size`` allows."""
        from .batch import Batch

        loop = asyncio.get_running_loop()
        batch = Batch(runnings, self.instance, self.workdir)
        reporters = [r for r in map(self._reporter, runnings) if r is not None]
        reporting.set(FanOut(reporters) if reporters else None)  # this task's own context
        try:
            if runnings[0].endpoint.is_async:
                results = await batch.run_async(lambda fn, *args: loop.run_in_executor(self.pool, fn, *args))
            else:
                context = contextvars.copy_context()
                results = await loop.run_in_executor(self.pool, context.run, batch.run_sync)
        except asyncio.CancelledError:  # a shutdown that would not wait: hand back what did not end
            results = [None] * len(runnings)
        finally:
            await self._close_reporters(runnings)
            if runnings[0].endpoint.codec.writes_files:
                for running in runnings:
                    shutil.rmtree(os.path.join(self.workdir, running.claim.id), ignore_errors=True)
        return [self.settle(running, result) for running, result in zip(runnings, results, strict=True)]

    def settle(self, running: Running, result: Any) -> Outcome | None:
        """The outcome of one task run in a sequence or a batch (``result`` None: it never ran)."""
        if running.stop_reason in ("cancelled", "lost"):
            return None  # the store already says what happened; the result is thrown away
        if result is None or isinstance(result, TaskInterrupted):
            return Outcome(running.claim.id, running.claim.token, TaskStatus.PENDING)  # hand it back untouched
        if isinstance(result, BaseException):
            return self._failed(running, result)
        body, content_type = result
        return self._outcome(running, TaskStatus.SUCCESS, result=body, content_type=content_type)

    async def _run_sync(self, running: Running, workdir: str) -> tuple[bytes, str]:
        call = running.sync = SyncCall()
        # The caller's context (e.g. a progress reporter) goes into the thread with the call.
        context = contextvars.copy_context()
        future = asyncio.get_running_loop().run_in_executor(
            self.pool, context.run, call.run, self._whole(running, workdir)
        )
        timeout, why = running.limit()
        try:
            if timeout is None:
                return await asyncio.shield(future)
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            running.stop_reason = why
            await self.interrupt(running, future)
            raise TaskInterrupted from None
        except asyncio.CancelledError:
            # Cancelled from outside (stop_task): the thread goes on until interrupted.
            await self.interrupt(running, future)
            if running.stop_reason == "shutdown" and future.done() and future.exception() is None:
                # The call returned before the interruption could land: it ran, so its result
                # stands (handing it back would run it a second time).
                return future.result()  # type: ignore[no-any-return]
            raise

    async def interrupt(self, running: Running, future: asyncio.Future[Any]) -> None:
        """Stop a sync call's thread; if it will not stop (stuck in C code), mark the process for recycling."""
        assert running.sync is not None
        running.sync.interrupt()
        # Whatever the thread ends with is settled here; nobody else awaits this future.
        future.add_done_callback(_retrieve)
        done, _ = await asyncio.wait([future], timeout=STOP_PATIENCE)
        if not done:
            logger.warning("task %s did not stop when interrupted; this worker will be recycled", running.claim.id)
            self.stuck = True

    # -- async -----------------------------------------------------------------------------

    async def _run_async(self, running: Running, workdir: str) -> tuple[bytes, str]:
        endpoint, claim = running.endpoint, running.claim
        codec = endpoint.codec
        loop = asyncio.get_running_loop()
        if len(claim.args) <= INLINE_ARGS and not codec.writes_files and not _binary(endpoint):
            kwargs = codec.load(claim.args, workdir)
        else:
            kwargs = await loop.run_in_executor(self.pool, codec.load, claim.args, workdir)
        reporting.set(running.reporter)  # this task's own context: no reset needed
        running.started_at = time.time()
        if codec.streams:
            coro = _stream_async(endpoint.fn(self.instance, **kwargs), running.reporter)
        else:
            coro = endpoint.fn(self.instance, **kwargs)
        timeout, why = running.limit()
        if timeout is None:
            value = await coro
        else:
            try:
                value = await asyncio.wait_for(coro, timeout)
            except asyncio.TimeoutError:
                running.stop_reason = why
                raise asyncio.CancelledError from None
        if codec.streams:
            return value  # already the encoded list of items (_stream_async)
        if codec.output_kind == "json":
            return codec.dump_result(value)
        return await loop.run_in_executor(self.pool, codec.dump_result, value)


def _stream(items: Any, reporter: Reporter | None) -> tuple[bytes, str]:
    """Run a sync generator task to its end: each item an output event, the result their list."""
    encoded = [reporter.output(item) if reporter is not None else dump_item(item) for item in items]
    return b"[" + b",".join(encoded) + b"]", "application/json"


async def _stream_async(items: Any, reporter: Reporter | None) -> tuple[bytes, str]:
    """As ``_stream`` for an async generator; a cancel or a timeout closes the generator."""
    encoded = []
    try:
        async for item in items:
            encoded.append(reporter.output(item) if reporter is not None else dump_item(item))
    finally:
        await items.aclose()
    return b"[" + b",".join(encoded) + b"]", "application/json"


def retry_delay(endpoint: Endpoint, attempt: int) -> float:
    """The wait before the automatic retry that follows failed attempt ``attempt`` (1-based)."""
    base = endpoint.retry_delay * endpoint.retry_backoff ** max(0, attempt - 1)
    return base * random.uniform(0.9, 1.1)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: an interrupted call's TaskInterrupted is expected


def _binary(endpoint: Endpoint) -> bool:
    return any(p.kind in BINARY_KINDS or p.kind == "ndarray" for p in endpoint.codec.params)


def format_traceback(exc: BaseException) -> str:
    """The failure's traceback from the first frame of the task's own code, as the dashboard and
    ``taskserve task ID`` show it: the worker's frames above it say nothing about the failure."""
    tb = exc.__traceback__
    while tb is not None and _workers_own(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb if tb is not None else exc.__traceback__))
    return text if len(text) <= MAX_TRACEBACK else "...\n" + text[-MAX_TRACEBACK:]


def _workers_own(filename: str) -> bool:
    """A frame of taskserve or of the standard library (the thread pool, the event loop), not the task's."""
    if filename.startswith(_TASKSERVE_DIR):
        return True
    return filename.startswith(_STDLIB_DIR) and not filename.startswith(_PACKAGES_DIRS)
