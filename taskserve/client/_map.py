"""What ``map()`` of both clients shares: the bookkeeping of one bulk run, no I/O.

A run submits its items in chunks of ``CHUNK`` (``POST /{r}/submit_many``) and then long-polls
``POST /{r}/wait_many`` on the oldest ``CHUNK`` open tasks, asking for ``MIN_DONE`` of them to
end before the answer: so N tasks cost about N / CHUNK submits plus N / MIN_DONE waits, and
JSON results come inline. Only results that are not JSON (images, files) are fetched one by one.

Into a route with a ``max_queue``, a chunk may be refused (429, nothing queued): the run then
halves it, and once it is down to one item waits for its own tasks to end (handing their
results out meanwhile) or for the server's ``Retry-After``, so a million items flow through a
queue bounded at a thousand without the caller writing a retry loop.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .._types import TaskStatus
from .._wire import array_from_wire
from ..exceptions import ClientError, QueueFull, TaskCancelled, TaskFailed, TaskNotFound
from ._base import EndpointInfo

CHUNK = 1000  # items per submit_many, ids per wait_many
MIN_DONE = 100  # ended tasks a wait_many waits for (fewer when fewer are open)
POLL = 2.0  # seconds one wait_many may wait; bounds how late a result is reported


def as_arguments(info: EndpointInfo, items: Iterable[Any]) -> list[dict[str, Any]]:
    """Each item as keyword arguments: a mapping is taken as they are, anything else is the one parameter.

    Raises:
        TypeError: a bare value for an endpoint that does not take exactly one parameter.
    """
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, Mapping):
            out.append(dict(item))
        elif len(info.params) == 1:
            out.append({info.params[0]: item})
        else:
            raise TypeError(
                f"map() on {info.name!r} takes dicts of arguments (it has parameters {info.params}); "
                f"got {type(item).__name__}. Bare values work only for an endpoint with one parameter."
            )
    return out


def chunk_params(params: list[tuple[str, str]], start: int) -> list[tuple[str, str]]:
    """The submit options of the chunk that starts at item ``start``.

    An idempotency key names the whole run; the server keys the items of one request
    ``KEY#i``, so each chunk carries ``KEY@start`` and no two items of a run share a key.
    """
    return [(k, f"{v}@{start}" if k == "idempotency_key" else v) for k, v in params]


class MapRun:
    """The state of one ``map()``: which tasks are open, what is ready to hand out, and in what order.

    Args:
        info: the endpoint.
        total: how many items.
        ordered: hand results out in input order (else in the order they end).
        handle: makes the client's task handle for an id, carried by the exceptions handed out.
    """

    def __init__(self, info: EndpointInfo, total: int, ordered: bool, handle: Callable[[str], Any]) -> None:
        self.info = info
        self.total = total
        self.ordered = ordered
        self.handle = handle
        self.open: dict[str, int] = {}  # task id -> input index, oldest first
        self.ready: dict[int, Any] = {}
        self.next_index = 0
        self.handed_out = 0
        self.unsent: collections.deque[tuple[int, list[dict[str, Any]]]] = collections.deque()

    def queue_chunks(self, items: list[dict[str, Any]]) -> None:
        self.unsent.extend((start, items[start : start + CHUNK]) for start in range(0, len(items), CHUNK))

    def refused(self, full: QueueFull) -> float:
        """The next chunk met a full queue: split it, or say how long to pause before sending it again.

        Returns 0 when the chunk was split (send the smaller one at once); else seconds to wait,
        which the caller spends waiting on its own open tasks when it has some.
        """
        start, chunk = self.unsent[0]
        if len(chunk) > 1:
            half = len(chunk) // 2
            self.unsent[0] = (start + half, chunk[half:])
            self.unsent.appendleft((start, chunk[:half]))
            return 0.0
        return min(POLL, max(0.05, full.retry_after or 1.0))

    def submitted(self, start: int, answer: Any) -> None:
        for offset, entry in enumerate(answer["tasks"]):
            self.open[entry["task_id"]] = start + offset

    def wait_body(self) -> dict[str, Any]:
        """The next ``wait_many`` request: the oldest open tasks, which the queue runs first."""
        ids = []
        for task_id in self.open:
            ids.append(task_id)
            if len(ids) == CHUNK:
                break
        return {"task_ids": ids, "timeout": POLL, "min_done": min(MIN_DONE, len(ids))}

    def absorb(self, answer: Any) -> list[tuple[str, str]]:
        """Take in a ``wait_many`` answer; returns (task id, result URL) of results to fetch one by one."""
        fetch: list[tuple[str, str]] = []
        for entry in answer["tasks"]:
            task_id = entry["task_id"]
            if task_id not in self.open:
                continue
            if entry["status"] == TaskStatus.SUCCESS.value and "result" not in entry:
                fetch.append((task_id, entry["result_url"]))
                continue
            self.settle(task_id, self.outcome(task_id, entry))
        for task_id in answer["missing"]:
            if task_id in self.open:
                self.settle(task_id, TaskNotFound(task_id))
        return fetch

    def outcome(self, task_id: str, entry: dict[str, Any]) -> Any:
        status = entry["status"]
        if status == TaskStatus.SUCCESS.value:
            value = entry["result"]
            return array_from_wire(value) if self.info.output_kind == "ndarray" else value
        task = self.handle(task_id)
        if status == TaskStatus.CANCELLED.value:
            return TaskCancelled(f"Task {task_id!r} was cancelled.", task, TaskStatus.CANCELLED)
        if status == TaskStatus.FAILURE.value:
            return TaskFailed(entry.get("error") or "the task failed", task, TaskStatus.FAILURE)
        return ClientError(f"Task {task_id!r} answered as ended in state {status!r}.")

    def settle(self, task_id: str, value: Any) -> None:
        self.ready[self.open.pop(task_id)] = value

    def check(self) -> None:
        if not self.open and not self.unsent and len(self.ready) + self.handed_out < self.total:
            raise ClientError(f"The server accepted fewer tasks than the {self.total} submitted to {self.info.name!r}.")

    @property
    def done(self) -> bool:
        return self.handed_out == self.total

    def take(self) -> list[Any]:
        """What can be handed out now: the next results in input order, or all that ended."""
        out = []
        if self.ordered:
            while self.next_index in self.ready:
                out.append(self.ready.pop(self.next_index))
                self.next_index += 1
        else:
            out = list(self.ready.values())
            self.ready.clear()
        self.handed_out += len(out)
        return out


class ProgressBar:
    """A ``rich`` progress bar over the tasks of one run; rich is imported only when asked for."""

    def __init__(self, description: str, total: int) -> None:
        try:
            from rich.progress import Progress
        except ImportError:  # pragma: no cover - depends on the install
            raise ImportError("map(progress=True) draws with rich: pip install 'taskserve[progress]'.") from None
        self._progress = Progress(transient=False)
        self._task = self._progress.add_task(description, total=total)
        self._progress.start()

    def advance(self, n: int) -> None:
        if n:
            self._progress.advance(self._task, n)

    def close(self) -> None:
        self._progress.stop()


class NoBar:
    def advance(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, description: str, total: int) -> ProgressBar | NoBar:
    return ProgressBar(description, total) if enabled else NoBar()
