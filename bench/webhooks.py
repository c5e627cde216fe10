"""How fast does one API server deliver webhooks? Deliveries per second to a local receiver.

    python bench/webhooks.py [--broker sqlite:///tmp/wh.db | redis://127.0.0.1:6379/15] [--tasks 2000] [--runs 5]

Each run ends ``--tasks`` tasks with a webhook through the queue (as workers would), then times
one ``Deliverer`` (what every API server runs, signing included) until the receiver has
acknowledged them all. The receiver is a bare ASGI app on uvicorn in a process of its own, so
it takes no CPU from the loop measured. Prints each run and the median; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import httpx

from taskserve._types import NewTask, Outcome, TaskStatus
from taskserve.queue import Queue
from taskserve.webhooks import Deliverer

ROUTE = "/noop"
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


async def receive(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The receiver: reads the body and answers 204."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_receiver(port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "uvicorn", "bench.webhooks:receive", "--port", str(port), "--log-level", "warning"]
    cmd += ["--no-access-log"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 15
    while True:
        try:
            httpx.post(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("the receiver did not start") from None
            time.sleep(0.05)


async def end_tasks(queue: Queue, n: int, url: str) -> None:
    """n tasks with a webhook, ended as successes: n deliveries due."""
    chunk = 1000
    while n > 0:
        batch = [NewTask(ROUTE, b'{"x":1}', webhook=url) for _ in range(min(chunk, n))]
        await queue.enqueue_many(batch)
        claims = await queue.claim([ROUTE], "bench", limit=len(batch))
        outcomes = [
            Outcome(c.id, c.token, TaskStatus.SUCCESS, result=b"1", content_type="application/json") for c in claims
        ]
        await queue.finish(outcomes)
        n -= len(batch)


async def one_run(queue: Queue, n: int, url: str) -> float:
    await end_tasks(queue, n, url)
    done = asyncio.Event()
    delivered = 0

    def count(outcome: str) -> None:
        nonlocal delivered
        if outcome == "delivered":
            delivered += 1
            if delivered == n:
                done.set()

    deliverer = Deliverer(queue, secret=SECRET, on_try=count)
    started = time.perf_counter()
    task = asyncio.create_task(deliverer.run())
    try:
        await asyncio.wait_for(done.wait(), 600)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return n / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default=None, help="a broker URL [default: a fresh SQLite file]")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = args.broker or f"sqlite:///{tmp}/webhooks.db"
        if broker.startswith("redis"):
            broker += ("&" if "?" in broker else "?") + f"prefix=benchwh-{uuid.uuid4().hex[:8]}"
        port = free_port()
        receiver = start_receiver(port)
        queue = Queue.from_url(broker)
        await queue.connect()
        try:
            rates = []
            for i in range(args.runs):
                rate = await one_run(queue, args.tasks, f"http://127.0.0.1:{port}/hook")
                rates.append(rate)
                print(f"run {i + 1}: {rate:,.0f} deliveries/s")
            print(f"webhooks ({queue.describe().split('?')[0]}, {args.tasks} per run, one API server): ", end="")
            print(f"median {statistics.median(rates):,.0f} deliveries/s over {args.runs} runs")
        finally:
            if broker.startswith("redis"):
                await clear(queue)
            await queue.close()
            receiver.terminate()
            receiver.wait(10)


async def clear(queue: Queue) -> None:
    import redis.asyncio as aioredis

    prefix = getattr(queue, "prefix", "")
    client = aioredis.Redis.from_url(queue.url.split("?")[0])
    keys = [k async for k in client.scan_iter(f"{prefix}:*", count=1000)]
    for i in range(0, len(keys), 1000):
        await client.delete(*keys[i : i + 1000])
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
