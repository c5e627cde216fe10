"""Does the queue stay fast as the store grows? Times the worker's path and the operator's reads at sizes.

    python bench/store_scale.py [--broker sqlite:///tmp/scale.db] [--sizes 0,100000,1000000]

Fills the store through the queue's own bulk path with finished tasks over two routes, one in
a hundred failed and one in ten owned by an API key (a busy day within the retention time), then
times single operations as an API server and a worker issue them: submit, claim+finish, status,
and what ``GET /tasks``, ``GET /queues`` and ``GET /workers`` read (a page of the newest tasks,
filtered by route, by status, by both, the page after a cursor deep in the store, and one key's
own tasks; counts and waits per route; the worker registry). Prints medians per operation and
size; nothing is asserted. A read that grew with the store would show as a figure growing with
the size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable

from taskserve._types import NewTask, Outcome, TaskStatus
from taskserve.queue import Queue

ROUTE = "/noop"
OTHER = "/other"
TENANT = "team-a"  # the owner (API key) of one task in ten, as on a server with keys


async def fill(queue: Queue, n: int) -> None:
    """Add n finished tasks, in chunks, as workers would have left them."""
    chunk = 5000
    while n > 0:
        batch = [
            NewTask(ROUTE if i % 2 else OTHER, b'{"x":1}', owner=TENANT if i % 10 == 0 else None)
            for i in range(min(chunk, n))
        ]
        await queue.enqueue_many(batch)
        claims = await queue.claim([ROUTE, OTHER], "filler", limit=len(batch))
        await queue.finish([done(c.id, c.token, i % 100 == 0) for i, c in enumerate(claims)])
        n -= len(batch)


def done(task_id: str, token: str, failed: bool) -> Outcome:
    if failed:
        return Outcome(task_id, token, TaskStatus.FAILURE, error="ValueError: bad input")
    return Outcome(task_id, token, TaskStatus.SUCCESS, result=b"1", content_type="application/json")


async def timed(op: Callable[[], Awaitable[object]], rounds: int = 30) -> float:
    """The median of ``rounds`` runs of one read, in milliseconds."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        await op()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


async def reads(queue: Queue) -> dict[str, float]:
    """What the operator's endpoints ask the store for, a page of 50 at a time."""
    _, cursor = await queue.list(limit=1000)
    for _ in range(20):  # a cursor some 20,000 tasks deep, as paging far back would hold
        _, cursor = await queue.list(limit=1000, cursor=cursor)
        if cursor is None:
            break
    return {
        "list": await timed(lambda: queue.list(limit=50)),
        "list route": await timed(lambda: queue.list(route=ROUTE, limit=50)),
        "list failed": await timed(lambda: queue.list(status="failure", limit=50)),
        "list route+ok": await timed(lambda: queue.list(route=OTHER, status="success", limit=50)),
        "list deep": await timed(lambda: queue.list(limit=50, cursor=cursor)),
        "list owner": await timed(lambda: queue.list(owner=TENANT, limit=50)),
        "queues": await timed(lambda: asyncio.gather(queue.counts(), queue.longest_waits([ROUTE, OTHER]))),
        "workers": await timed(queue.workers),
    }


async def measure(queue: Queue, rounds: int = 300) -> dict[str, float]:
    submit, cycle, status = [], [], []
    ids = []
    for _ in range(rounds):
        t = time.perf_counter()
        ids.append((await queue.enqueue(NewTask(ROUTE, b'{"x":2}'))).id)
        submit.append(time.perf_counter() - t)
    for _ in range(rounds):
        t = time.perf_counter()
        claims = await queue.claim([ROUTE], "bench")
        await queue.finish([Outcome(c.id, c.token, TaskStatus.SUCCESS, result=b"2", content_type="x") for c in claims])
        cycle.append(time.perf_counter() - t)
    for task_id in ids:
        t = time.perf_counter()
        await queue.get(task_id)
        status.append(time.perf_counter() - t)
    ms = 1000
    return {
        "submit": statistics.median(submit) * ms,
        "claim+finish": statistics.median(cycle) * ms,
        "status": statistics.median(status) * ms,
    }


READS = ["list", "list route", "list failed", "list route+ok", "list deep", "list owner", "queues", "workers"]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default=None, help="default: a fresh SQLite file in a temp dir")
    parser.add_argument("--sizes", default="0,100000,1000000")
    args = parser.parse_args()
    broker = args.broker or f"sqlite:///{tempfile.mkdtemp()}/scale.db"
    queue = Queue.from_url(broker)
    await queue.connect()
    stored = 0
    print(f"broker {queue.describe()}")
    names = ["submit", "claim+finish", "status", *READS]
    print("medians in ms")
    print(f"{'stored tasks':>13} | " + " | ".join(f"{n:>{max(len(n), 6)}}" for n in names) + " | fill s")
    for size in (int(s) for s in args.sizes.split(",")):
        t = time.perf_counter()
        await fill(queue, size - stored)
        filled = time.perf_counter() - t
        stored = size
        m = {**await measure(queue), **await reads(queue)}
        stored += 300
        print(f"{size:>13,} | " + " | ".join(f"{m[n]:>{max(len(n), 6)}.3f}" for n in names) + f" | {filled:.0f}")
    if broker.startswith("sqlite"):
        path = broker.split("///", 1)[1]
        print(f"file size {os.path.getsize(path) / 1e6:.0f} MB for {stored:,} tasks")
    await queue.close()


if __name__ == "__main__":
    asyncio.run(main())
