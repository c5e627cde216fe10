"""How taskserve's own clients hold up when one of them is shared by many callers, and what map() costs.

    .venv/bin/python bench/clients.py                       # the client as shipped, async and sync, and map()
    .venv/bin/python bench/clients.py --variants all --with-path /tmp/deps   # every transport option measured

Starts ``taskserve serve bench.services.ts_service:Bench`` (2 workers, SQLite, as bench/run.py
does), then drives it through ONE client shared by 1, 8, 64 and 256 concurrent callers
(coroutines for AsyncHTTPClient, threads for SyncHTTPClient), each looping submit → wait → get
on the no-op task for a fixed time. Prints tasks/s per level and the ratio 256/8 (target
≥ 0.90). Then ``map()`` over 10,000 no-op tasks: tasks/s end to end (target ≥ 5,000) and the
HTTP requests it took.

Transport variants (``--variants``): ``shipped`` (the client's default), ``httpx-one-pool``
(httpx's defaults: one pool, 100 connections, 20 kept alive), ``httpx-keepalive`` (one pool,
every connection kept alive), ``httpx-pools`` (several small pools), ``aiohttp`` and
``httpx2`` (adapters; ``--with-path`` names where those packages are installed, appended to
sys.path so they never shadow the project's own).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

import taskserve  # noqa: E402
from bench.systems import TaskServe  # noqa: E402
from taskserve.client import _transport  # noqa: E402

LEVELS = (1, 8, 64, 256)


# -- transports measured beside the shipped one --------------------------------------------


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx requests sent by one aiohttp session (its pool is a dict of idle connections)."""

    def __init__(self) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self._session: Any = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:
            connector = self._aiohttp.TCPConnector(limit=0, limit_per_host=0)
            self._session = self._aiohttp.ClientSession(connector=connector, auto_decompress=False)
        timeout = request.extensions.get("timeout", {})
        async with self._session.request(
            request.method,
            str(request.url),
            headers=dict(request.headers),
            data=request.content,
            timeout=self._aiohttp.ClientTimeout(total=None, sock_read=timeout.get("read")),
        ) as resp:
            body = await resp.read()
            return httpx.Response(resp.status, headers=list(resp.raw_headers), content=body)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class Httpx2Transport(httpx.AsyncBaseTransport):
    """httpx requests sent by an httpx2 client (pydantic's fork of httpx, with httpcore2)."""

    def __init__(self) -> None:
        import httpx2

        self._client = httpx2.AsyncClient(limits=httpx2.Limits(max_connections=None, max_keepalive_connections=None))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        resp = await self._client.request(
            request.method, str(request.url), headers=list(request.headers.raw), content=request.content
        )
        return httpx.Response(resp.status_code, headers=list(resp.headers.raw), content=resp.content)

    async def aclose(self) -> None:
        await self._client.aclose()


ASYNC_VARIANTS: dict[str, Callable[[], httpx.AsyncBaseTransport | None]] = {
    "shipped": lambda: None,
    "httpx-one-pool": lambda: httpx.AsyncHTTPTransport(),
    "httpx-keepalive": lambda: httpx.AsyncHTTPTransport(
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=256)
    ),
    "httpx-pools": lambda: _transport.AsyncPoolsTransport(pools=8, per_pool=32),
    "httpx-pools-32x8": lambda: _transport.AsyncPoolsTransport(pools=32, per_pool=8),
    "httpx-pools-64x4": lambda: _transport.AsyncPoolsTransport(pools=64, per_pool=4),
    "aiohttp": AiohttpTransport,
    "httpx2": Httpx2Transport,
}
SYNC_VARIANTS: dict[str, Callable[[], httpx.BaseTransport | None]] = {
    "shipped": lambda: None,
    "httpx-one-pool": lambda: httpx.HTTPTransport(),
    "httpx-keepalive": lambda: httpx.HTTPTransport(
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=256)
    ),
    "httpx-pools": lambda: _transport.PoolsTransport(pools=8, per_pool=32),
}


# -- shared-client load --------------------------------------------------------------------


async def async_level(url: str, make: Callable[[], Any], callers: int, seconds: float) -> float:
    """Tasks/s of one AsyncHTTPClient shared by ``callers`` coroutines, each looping submit → wait → get."""
    transport = make()
    async with taskserve.AsyncHTTPClient(url, transport=transport) as client:
        stop_at = time.monotonic() + seconds
        counted_from = time.monotonic() + min(1.0, seconds / 4)  # after every caller's first round trip
        done = 0

        async def caller(k: int) -> None:
            nonlocal done
            x = 0
            while time.monotonic() < stop_at:
                task = await client.noop.submit(x=x)
                await task.wait(timeout=60)
                assert await task.get() == x
                x += 1
                if time.monotonic() >= counted_from:
                    done += 1

        await asyncio.gather(*(caller(k) for k in range(callers)))
        elapsed = time.monotonic() - counted_from
    return done / elapsed


def sync_level(url: str, make: Callable[[], Any], callers: int, seconds: float) -> float:
    """Tasks/s of one SyncHTTPClient shared by ``callers`` threads."""
    with taskserve.SyncHTTPClient(url, transport=make()) as client:
        endpoint = client.noop
        stop_at = time.monotonic() + seconds
        counted_from = time.monotonic() + min(1.0, seconds / 4)
        lock = threading.Lock()
        done = [0]

        def caller(k: int) -> None:
            x = 0
            while time.monotonic() < stop_at:
                task = endpoint.submit(x=x)
                assert task.get(timeout=60) == x
                x += 1
                if time.monotonic() >= counted_from:
                    with lock:
                        done[0] += 1

        with ThreadPoolExecutor(callers) as pool:
            list(pool.map(caller, range(callers)))
        elapsed = time.monotonic() - counted_from
    return done[0] / elapsed


def row(name: str, rates: list[float]) -> str:
    ratio = rates[-1] / rates[1] if len(rates) > 1 and rates[1] else float("nan")
    cells = " | ".join(f"{r:7.0f}" for r in rates)
    verdict = "ok" if ratio >= 0.9 else "below 0.90"
    return f"| {name:<24} | {cells} | {ratio:5.2f} ({verdict}) |"


# -- map() ---------------------------------------------------------------------------------


class CountingTransport(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return super().handle_request(request)


def bench_map(url: str, n: int) -> tuple[float, int]:
    transport = CountingTransport()
    with taskserve.SyncHTTPClient(url, transport=transport) as client:
        endpoint = client.noop
        started = time.perf_counter()
        results = list(endpoint.map(range(n)))
        elapsed = time.perf_counter() - started
    assert results == list(range(n)), "map() returned wrong results"
    return n / elapsed, transport.requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="shipped", help="comma-separated, or 'all'")
    parser.add_argument("--seconds", type=float, default=4.0, help="per concurrency level")
    parser.add_argument("--map-tasks", type=int, default=10_000)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: async, sync, map")
    parser.add_argument("--with-path", default="", help="a directory holding aiohttp / httpx2 (appended to sys.path)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.with_path:
        sys.path.append(args.with_path)
    names = list(ASYNC_VARIANTS) if args.variants == "all" else args.variants.split(",")
    skip = set(args.skip.split(","))

    figures: dict[str, Any] = {"levels": LEVELS, "async": {}, "sync": {}}
    system = TaskServe()
    system.prepare()
    running = system.start(broker="sqlite", workers=2)
    url = running.driver["url"]
    print(f"taskserve at {url} (SQLite, 2 workers), {os.cpu_count()} CPUs; {args.seconds:g} s per level\n")
    header = "| " + f"{'client, transport':<24} | " + " | ".join(f"{c:>7}" for c in LEVELS) + " | 256/8 |"
    rule = "|" + "-" * 26 + "|" + "|".join("-" * 9 for _ in LEVELS) + "|" + "-" * 19 + "|"
    try:
        if "async" not in skip:
            print("AsyncHTTPClient shared by N coroutines, tasks/s (submit, wait, get):\n" + header + "\n" + rule)
            for name in names:
                try:
                    rates = [asyncio.run(async_level(url, ASYNC_VARIANTS[name], c, args.seconds)) for c in LEVELS]
                except ImportError as exc:
                    print(f"| {name:<24} | skipped: {exc}")
                    continue
                print(row(name, rates), flush=True)
                figures["async"][name] = rates
        if "sync" not in skip:
            print("\nSyncHTTPClient shared by N threads, tasks/s (submit, get with wait):\n" + header + "\n" + rule)
            for name in [n for n in names if n in SYNC_VARIANTS]:
                rates = []
                for c in LEVELS:
                    try:
                        rates.append(sync_level(url, SYNC_VARIANTS[name], c, args.seconds))
                    except taskserve.ClientError as exc:
                        print(f"| {name:<24} | failed at {c} threads: {exc}", flush=True)
                        break
                else:
                    print(row(name, rates), flush=True)
                    figures["sync"][name] = rates
        if "map" not in skip:
            rate, requests = bench_map(url, args.map_tasks)
            figures["map"] = {"tasks": args.map_tasks, "rate": rate, "requests": requests}
            verdict = "ok" if rate >= 5000 else "below 5,000"
            print(
                f"\nmap() over {args.map_tasks} no-op tasks: {rate:,.0f} tasks/s end to end ({verdict}), "
                f"{requests} HTTP requests ({requests / args.map_tasks * 100:.2f} per 100 tasks)"
            )
    finally:
        running.stop()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
