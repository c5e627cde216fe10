"""What progress and streamed output cost, and how many events one API server delivers.

    .venv/bin/python bench/events.py [--broker sqlite|redis] [--runs 5] [--clients 100]

Starts ``taskserve serve bench.services.events_service:Events`` (2 workers) and measures, through
taskserve's own AsyncHTTPClient:

1. a task reporting progress 1,000 times against the same task without reports: milliseconds
   from submit to its result, each (the reports' cost is the difference);
2. a generator of 10,000 items followed by one ``task.events()``: items delivered per second;
3. ``--clients`` SSE clients at once (one AsyncHTTPClient shared by all), each following its own
   generator task of 1,000 items: output events delivered per second in all, from the first
   submit to the last stream ended, and how many streams lost or repeated an item (must be 0).

Prints each run and the medians; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

import taskserve  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(broker: str, tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = (
        f"sqlite:///{tmp}/events.db"
        if broker == "sqlite"
        else f"redis://127.0.0.1:6379/15?prefix=bench-events-{uuid.uuid4().hex[:8]}"
    )
    cmd = [sys.executable, "-m", "taskserve", "serve", "bench.services.events_service:Events", "--port", str(port)]
    cmd += ["--broker", url, "--workers", "2", "--concurrency", "4"]
    log = open(os.path.join(tmp, "server.log"), "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not get ready; see {tmp}/server.log")


async def timed_task(client: taskserve.AsyncHTTPClient, route: str, n: int) -> float:
    began = time.perf_counter()
    task = await getattr(client, route).submit(n=n)
    assert await task.get(timeout=120) == n
    return (time.perf_counter() - began) * 1000


async def progress_cost(client: taskserve.AsyncHTTPClient) -> tuple[float, float]:
    plain = statistics.median([await timed_task(client, "noop", 1000) for _ in range(5)])
    reported = statistics.median([await timed_task(client, "report", 1000) for _ in range(5)])
    return plain, reported


async def one_stream(client: taskserve.AsyncHTTPClient, n: int) -> float:
    task = await client.stream.submit(n=n)
    began, got = time.perf_counter(), []
    async for event in task.events():
        if event.kind == "output":
            got.append(event.data)
    elapsed = time.perf_counter() - began
    assert got == list(range(n)), "items lost, repeated or out of order"
    return n / elapsed


async def many_streams(client: taskserve.AsyncHTTPClient, clients: int, items: int) -> tuple[float, int]:
    tasks = [await client.tokens.submit(n=items) for _ in range(clients)]
    began = time.perf_counter()

    async def follow(task: Any) -> int:
        got = [e.data async for e in task.events() if e.kind == "output"]
        return 0 if got == list(range(items)) else 1

    wrong = sum(await asyncio.gather(*(follow(t) for t in tasks)))
    return clients * items / (time.perf_counter() - began), wrong


async def run(args: argparse.Namespace, base: str) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "progress_plain_ms": [],
        "progress_1000_ms": [],
        "stream_items_s": [],
        "sse_events_s": [],
    }
    async with taskserve.AsyncHTTPClient(base) as client:
        await timed_task(client, "noop", 1)  # warm-up
        for k in range(args.runs):
            plain, reported = await progress_cost(client)
            items = await one_stream(client, 10_000)
            rate, wrong = await many_streams(client, args.clients, 1000)
            figures["progress_plain_ms"].append(plain)
            figures["progress_1000_ms"].append(reported)
            figures["stream_items_s"].append(items)
            figures["sse_events_s"].append(rate)
            figures.setdefault("sse_wrong", 0)
            figures["sse_wrong"] += wrong
            print(
                f"run {k + 1}: task {plain:.1f} ms, with 1,000 progress reports {reported:.1f} ms | "
                f"generator of 10,000 items: {items:,.0f} items/s to one client | "
                f"{args.clients} SSE clients: {rate:,.0f} output events/s, {wrong} streams wrong",
                flush=True,
            )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="taskserve-bench-events-")
    proc, base = start(args.broker, tmp)
    try:
        print(f"taskserve at {base} ({args.broker}, 2 workers x 4), {os.cpu_count()} CPUs")
        figures = asyncio.run(run(args, base))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in figures.items() if isinstance(v, list)}
    print(
        f"\nmedians over {args.runs} runs ({args.broker}): a task {med['progress_plain_ms']:.1f} ms, "
        f"with 1,000 progress reports {med['progress_1000_ms']:.1f} ms "
        f"(+{med['progress_1000_ms'] - med['progress_plain_ms']:.1f} ms); "
        f"10,000-item generator {med['stream_items_s']:,.0f} items/s; "
        f"{args.clients} SSE clients {med['sse_events_s']:,.0f} events/s; streams wrong: {figures['sse_wrong']}"
    )
    if args.json:
        args.json.write_text(json.dumps({"medians": med, "runs": figures}, indent=2))


if __name__ == "__main__":
    main()
