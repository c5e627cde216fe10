"""Batchable tasks: queued tasks of a route claimed together and answered by one call.

A real worker in this test's process on a real SQLite file (burst mode), so a test can see
how many calls there were, of what sizes, and what each task's outcome is.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import taskserve
from taskserve._types import NewTask, TaskStatus
from taskserve.exceptions import ServiceDefinitionError
from taskserve.queue import Queue
from taskserve.service import load_service
from taskserve.worker.core import Worker

pytestmark = pytest.mark.anyio

CALLS: list[int] = []  # the number of items of each call, in order
HOLD = threading.Event()


@taskserve.service(name="batches")
class Batches:
    @taskserve.task(batchable=True, max_batch_size=4, max_latency_ms=300)
    def lengths(self, texts: list[str]) -> list[int]:
        CALLS.append(len(texts))
        if "poison" in texts:
            raise RuntimeError("the whole batch failed")
        if "slow" in texts:
            HOLD.wait(10)
        return [ValueError(f"bad item {t!r}") if t == "bad" else len(t) for t in texts]  # type: ignore[misc]

    @taskserve.task(batchable=True, max_batch_size=64, max_latency_ms=0)
    async def scale(self, rows: np.ndarray) -> np.ndarray:
        CALLS.append(len(rows))
        return rows * 2


SERVICE = load_service(f"{__name__}:Batches")


def args(route: str, **kwargs: object) -> bytes:
    return SERVICE.by_route[route].codec.validate(kwargs)


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[Queue]:
    queue = Queue.from_url(f"sqlite:///{tmp_path}/q.db")
    await queue.connect()
    CALLS.clear()
    HOLD.clear()
    yield queue
    await queue.close()


def array(stored: object) -> np.ndarray:
    """An array result: the typed form (dtype, shape, data as base64 or lists), or plain lists."""
    if not isinstance(stored, dict):
        return np.asarray(stored)
    if isinstance(stored["data"], str):
        raw = np.frombuffer(base64.b64decode(stored["data"]), dtype=stored["dtype"])
        return raw.reshape(stored["shape"])
    return np.asarray(stored["data"], dtype=stored["dtype"]).reshape(stored["shape"])


async def result(queue: Queue, task_id: str) -> Any:
    stored = await queue.get_result(task_id)
    assert stored is not None
    return json.loads(stored.body)


async def test_queued_tasks_run_as_one_call_and_each_gets_its_slice(queue: Queue) -> None:
    tasks = [NewTask("/lengths", args("/lengths", texts=[t])) for t in ("a", "bb", "ccc")]
    await queue.enqueue_many(tasks)
    await Worker(SERVICE, queue, name="w").run(burst=True)
    assert CALLS == [3]
    assert [await result(queue, t.id) for t in tasks] == [[1], [2], [3]]
    # Each task's status says how many items the call that answered it held.
    assert [(await queue.get(t.id)).batch_size for t in tasks] == [3, 3, 3]


async def test_calls_hold_at_most_max_batch_size_items(queue: Queue) -> None:
    tasks = [NewTask("/lengths", args("/lengths", texts=["a"])) for _ in range(5)]
    await queue.enqueue_many(tasks)
    await Worker(SERVICE, queue, name="w").run(burst=True)
    assert sorted(CALLS) == [1, 4]
    assert [await result(queue, t.id) for t in tasks] == [[1]] * 5


async def test_a_task_bigger_than_max_batch_size_runs_alone(queue: Queue) -> None:
    tasks = [NewTask("/lengths", args("/lengths", texts=t)) for t in (["a"] * 6, ["bb"])]
    await queue.enqueue_many(tasks)
    await Worker(SERVICE, queue, name="w").run(burst=True)
    assert sorted(CALLS) == [1, 6]
    assert [await result(queue, t.id) for t in tasks] == [[1] * 6, [2]]
    assert [(await queue.get(t.id)).batch_size for t in tasks] == [6, 1]


async def test_an_exception_item_fails_only_its_own_task(queue: Queue) -> None:
    tasks = [NewTask("/lengths", args("/lengths", texts=t), max_attempts=1) for t in (["ok"], ["bad"], ["fine"])]
    await queue.enqueue_many(tasks)
    await Worker(SERVICE, queue, name="w").run(burst=True)
    records = [await queue.get(t.id) for t in tasks]
    assert [r.status for r in records] == [TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.SUCCESS]
    assert records[1].error == "ValueError: bad item 'bad'"
    assert records[1].errors[0]["type"] == "ValueError" and records[1].errors[0]["message"] == "bad item 'bad'"
    assert CALLS == [3]


async def test_a_call_that_raises_is_run_again_task_by_task(queue: Queue) -> None:
    tasks = [NewTask("/lengths", args("/lengths", texts=t), max_attempts=1) for t in (["x"], ["poison"], ["yy"])]
    await queue.enqueue_many(tasks)
    await Worker(SERVICE, queue, name="w").run(burst=True)
    statuses = [(await queue.get(t.id)).status for t in tasks]
    assert statuses == [TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.SUCCESS]
    assert "the whole batch failed" in str((await queue.get(tasks[1].id)).error)
    assert CALLS == [3, 1, 1, 1]


async def test_arrays_are_joined_on_axis_0_and_split_back(queue: Queue) -> None:
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((1, 3), dtype=np.float32)
    tasks = [NewTask("/scale", args("/scale", rows=x)) for x in (a, b)]
    await queue.enqueue_many(tasks)
    await Worker(SERVICE, queue, name="w").run(burst=True)
    assert CALLS == [3]
    for task, rows in zip(tasks, (a, b), strict=True):
        np.testing.assert_array_equal(array(await result(queue, task.id)), rows * 2)


async def test_the_worker_waits_for_more_items_only_while_the_queue_has_fewer(queue: Queue) -> None:
    first = await queue.enqueue(NewTask("/lengths", args("/lengths", texts=["a"])))
    worker = Worker(SERVICE, queue, name="w")
    run = asyncio.create_task(worker.run(burst=True))
    await asyncio.sleep(0.1)  # inside the 300 ms the worker waits for more
    second = await queue.enqueue(NewTask("/lengths", args("/lengths", texts=["bb"])))
    await asyncio.wait_for(run, 10)
    assert CALLS == [2]
    assert [await result(queue, t.id) for t in (first, second)] == [[1], [2]]


async def test_cancelling_one_task_of_a_running_batch_discards_only_its_slice(queue: Queue) -> None:
    tasks = [NewTask("/lengths", args("/lengths", texts=t)) for t in (["slow"], ["b"], ["cc"])]
    await queue.enqueue_many(tasks)
    run = asyncio.create_task(Worker(SERVICE, queue, name="w").run(burst=True))
    while not CALLS:
        await asyncio.sleep(0.01)
    await queue.cancel(tasks[1].id)
    await asyncio.sleep(0.1)
    HOLD.set()
    await asyncio.wait_for(run, 10)
    statuses = [(await queue.get(t.id)).status for t in tasks]
    assert statuses == [TaskStatus.SUCCESS, TaskStatus.CANCELLED, TaskStatus.SUCCESS]
    assert CALLS == [3]
    assert await result(queue, tasks[2].id) == [2]


def test_a_batchable_function_takes_one_list_parameter() -> None:
    with pytest.raises(ServiceDefinitionError, match="exactly one parameter"):

        @taskserve.service
        class Two:
            @taskserve.task(batchable=True)
            def f(self, a: list[str], b: int) -> list[int]: ...

    with pytest.raises(ServiceDefinitionError, match="list"):

        @taskserve.service
        class NotAList:
            @taskserve.task(batchable=True)
            def f(self, a: str) -> list[int]: ...


async def test_each_call_is_one_batch_size_observation(queue: Queue) -> None:
    from prometheus_client import REGISTRY

    def observed(name: str) -> float:
        return REGISTRY.get_sample_value(f"taskserve_task_batch_size_{name}", {"endpoint": "lengths"}) or 0.0

    count, total = observed("count"), observed("sum")
    await queue.enqueue_many([NewTask("/lengths", args("/lengths", texts=["a"])) for _ in range(5)])
    await Worker(SERVICE, queue, name="w").run(burst=True)
    assert sorted(CALLS) == [1, 4]
    assert (observed("count") - count, observed("sum") - total) == (2, 5)
