"""Does the queue stay fast as the store grows? Times submit, claim+finish and status at sizes.

    python bench/store_scale.py [--broker sqlite:///tmp/scale.db] [--sizes 0,100000,1000000]

Fills the store through the queue's own bulk path with finished tasks (a busy day within the
retention time), then times single operations as an API server and a worker issue them.
Prints medians per operation and size; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

from taskserve._types import NewTask, Outcome, TaskStatus
from taskserve.queue import Queue

ROUTE = "/noop"


async def fill(queue: Queue, n: int) -> None:
    """Add n finished tasks, in chunks, as workers would have left them."""
    chunk = 5000
    while n > 0:
        batch = [NewTask(ROUTE, b'{"x":1}') for _ in range(min(chunk, n))]
        await queue.enqueue_many(batch)
        claims = await queue.claim([ROUTE], "filler", limit=len(batch))
        await queue.finish(
            [Outcome(c.id, c.token, TaskStatus.SUCCESS, result=b"1", content_type="application/json") for c in claims]
        )
        n -= len(batch)


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
    print(f"{'stored tasks':>13} | {'submit ms':>9} | {'claim+finish ms':>15} | {'status ms':>9} | fill s")
    for size in (int(s) for s in args.sizes.split(",")):
        t = time.perf_counter()
        await fill(queue, size - stored)
        filled = time.perf_counter() - t
        stored = size
        m = await measure(queue)
        stored += 300
        print(f"{size:>13,} | {m['submit']:>9.3f} | {m['claim+finish']:>15.3f} | {m['status']:>9.3f} | {filled:.0f}")
    if broker.startswith("sqlite"):
        path = broker.split("///", 1)[1]
        print(f"file size {os.path.getsize(path) / 1e6:.0f} MB for {stored:,} tasks")
    await queue.close()


if __name__ == "__main__":
    asyncio.run(main())
