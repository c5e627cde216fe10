"""Faults only a shared Redis meets: hosts whose clocks disagree, and replies lost on the wire.

Lost replies go through a small TCP proxy that forwards to the real Redis and, once, drops the
client's connection right after Redis answered a chosen script, as a network fault would; redis-py
then re-sends the script, and the queue must answer as if the first reply had arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import types
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlparse

import pytest

from taskserve._splice import STORE_CHUNK, SpooledArgs
from taskserve._types import NewTask, Outcome, TaskStatus
from taskserve.queue import base
from taskserve.queue.redis import SCRIPTS, RedisQueue

from .conftest import REDIS_URL, clear_redis, need_redis

pytestmark = [pytest.mark.redis, pytest.mark.anyio]


def task(**options: object) -> NewTask:
    return NewTask(route="/gen", args=b"{}", **options)  # type: ignore[arg-type]


class LosingProxy:
    """Forwards connections to Redis; once armed with a script, loses the reply to its next run."""

    def __init__(self) -> None:
        target = urlparse(REDIS_URL)
        self.target = (target.hostname or "127.0.0.1", target.port or 6379)
        self.marker: bytes | None = None  # what the doomed command carries: a script's sha, or bytes of its data
        self.dropped = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def arm(self, script: str) -> None:
        self.marker = hashlib.sha1(SCRIPTS[script].encode()).hexdigest().encode()

    def arm_data(self, marker: bytes) -> None:
        """Lose the reply to the next command whose data holds ``marker``, whichever command it is."""
        self.marker = marker

    async def _handle(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        redis_in, redis_out = await asyncio.open_connection(*self.target)
        doomed = False  # this connection carries the armed script: its reply is to be lost

        async def upstream() -> None:
            nonlocal doomed
            tail = b""  # the end of the last read: a marker may span two
            while data := await client_in.read(65536):
                if self.marker is not None and self.marker in tail + data:
                    doomed, self.marker = True, None
                tail = data[-64:]
                redis_out.write(data)
                await redis_out.drain()

        async def downstream() -> None:
            while data := await redis_in.read(65536):
                if doomed:  # Redis has run the script: drop the connection instead of answering
                    self.dropped += 1
                    return
                client_out.write(data)
                await client_out.drain()

        pipes = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        with contextlib.suppress(ConnectionError):
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for pipe in pipes:
            pipe.cancel()
        for writer in (client_out, redis_out):
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
def prefix() -> Iterator[str]:
    need_redis()
    prefix = f"taskserve-faults-{uuid.uuid4().hex}"
    yield prefix
    clear_redis(prefix)


@pytest.fixture
async def proxied(prefix: str) -> AsyncIterator[tuple[RedisQueue, LosingProxy]]:
    """A queue that reaches Redis through a LosingProxy, its scripts already loaded."""
    proxy = LosingProxy()
    await proxy.start()
    queue = RedisQueue(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix)
    for script in SCRIPTS.values():  # so that the armed call is the script's run, not a NOSCRIPT answer
        await queue._client.script_load(script)
    yield queue, proxy
    await queue.close()
    await proxy.close()


async def test_a_lost_claim_reply_hands_the_task_out_once(proxied: tuple[RedisQueue, LosingProxy]) -> None:
    queue, proxy = proxied
    record = await queue.enqueue(task(max_attempts=1))
    proxy.arm("claim")
    [claim] = await queue.claim(["/gen"], "w", limit=5)
    assert proxy.dropped == 1
    assert (claim.id, claim.attempts) == (record.id, 1)
    stored = await queue.get(record.id)
    assert (stored.status, stored.attempts) == (TaskStatus.IN_PROGRESS, 1)
    assert await queue.finish([Outcome(claim.id, claim.token, TaskStatus.SUCCESS, b"1", "application/json")]) == [True]


async def test_a_lost_cancel_reply_still_answers_cancelled(proxied: tuple[RedisQueue, LosingProxy]) -> None:
    queue, proxy = proxied
    record = await queue.enqueue(task())
    proxy.arm("move")  # the cancel
    cancelled = await queue.cancel(record.id)
    assert proxy.dropped == 1
    assert cancelled.status is TaskStatus.CANCELLED
    assert await queue.finished_counts() == {("/gen", "cancelled"): 1}


async def test_a_lost_finish_reply_still_reports_applied(proxied: tuple[RedisQueue, LosingProxy]) -> None:
    queue, proxy = proxied
    record = await queue.enqueue(task())
    [claim] = await queue.claim(["/gen"], "w")
    proxy.arm("move")  # the finish
    assert await queue.finish([Outcome(claim.id, claim.token, TaskStatus.SUCCESS, b"1", "application/json")]) == [True]
    assert proxy.dropped == 1
    assert (await queue.get(record.id)).status is TaskStatus.SUCCESS
    assert await queue.finished_counts() == {("/gen", "success"): 1}


async def test_a_lost_enqueue_reply_stores_the_task_once(proxied: tuple[RedisQueue, LosingProxy]) -> None:
    queue, proxy = proxied
    proxy.arm("enqueue")
    record = await queue.enqueue(task())
    assert proxy.dropped == 1
    assert (await queue.get(record.id)).status is TaskStatus.PENDING
    assert await queue.counts() == {("/gen", "pending"): 1}


def spooled(data: bytes) -> SpooledArgs:
    """Arguments as the API hands over an upload over a MiB: in a temporary file."""
    args = SpooledArgs()
    args.write(data)
    return args


async def staged(queue: RedisQueue) -> list[bytes]:
    return [key async for key in queue._client.scan_iter(f"{queue.prefix}:up:*")]


async def test_a_lost_reply_to_a_chunk_of_large_arguments_stores_the_chunk_once(
    proxied: tuple[RedisQueue, LosingProxy],
) -> None:
    queue, proxy = proxied
    marker = b"lose-this-reply"  # starts the second chunk sent: that command's reply is lost
    data = b'{"blob": "' + b"a" * (STORE_CHUNK - 10) + marker + b"a" * 5_000_000 + b'"}'
    proxy.arm_data(marker)
    record = await queue.enqueue(NewTask(route="/gen", args=spooled(data)))
    assert proxy.dropped == 1
    [claim] = await queue.claim(["/gen"], "w")
    assert claim.id == record.id
    assert len(claim.args) == len(data) and claim.args == data


async def test_a_lost_reply_to_a_replayed_large_submit_still_answers_the_replay(
    proxied: tuple[RedisQueue, LosingProxy],
) -> None:
    queue, proxy = proxied
    data = b'{"blob": "' + b"a" * 2_000_000 + b'"}'
    first = await queue.enqueue(NewTask(route="/gen", args=data, idempotency_key="k"))
    proxy.arm("enqueue")
    again = await queue.enqueue(NewTask(route="/gen", args=spooled(data), idempotency_key="k"))
    assert proxy.dropped == 1
    assert again.replayed and again.id == first.id
    assert await staged(queue) == []
    assert await queue.counts() == {("/gen", "pending"): 1}


@contextlib.contextmanager
def clock_off_by(seconds: float) -> Iterator[None]:
    """This process's clock, as the queue modules see it, ``seconds`` off (the only thing mocked)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(base, "time", types.SimpleNamespace(time=lambda: time.time() + seconds))
        yield


@pytest.fixture
async def two_hosts(prefix: str) -> AsyncIterator[tuple[RedisQueue, RedisQueue]]:
    honest, skewed = RedisQueue(REDIS_URL, prefix=prefix), RedisQueue(REDIS_URL, prefix=prefix)
    yield honest, skewed
    await honest.close()
    await skewed.close()


async def test_a_host_with_a_fast_clock_recovers_no_valid_lease(two_hosts: tuple[RedisQueue, RedisQueue]) -> None:
    honest, fast = two_hosts
    record = await honest.enqueue(task(max_attempts=3))
    [claim] = await honest.claim(["/gen"], "w", lease=10)
    with clock_off_by(+30):
        assert await fast.recover() == 0
        assert await fast.claim(["/gen"], "w2") == []
    assert await honest.still_held({claim.id: claim.token}) == {claim.id}
    assert (await honest.get(record.id)).attempts == 1


async def test_a_host_with_a_slow_clock_takes_a_lease_others_honour(two_hosts: tuple[RedisQueue, RedisQueue]) -> None:
    honest, slow = two_hosts
    await honest.enqueue(task(max_attempts=3))
    with clock_off_by(-30):
        [claim] = await slow.claim(["/gen"], "w", lease=10)
        assert await slow.extend({claim.id: claim.token}, lease=10) == {claim.id}
    assert await honest.recover() == 0
    assert await honest.still_held({claim.id: claim.token}) == {claim.id}


async def test_task_times_come_from_the_store_clock(two_hosts: tuple[RedisQueue, RedisQueue]) -> None:
    honest, fast = two_hosts
    with clock_off_by(+3600):
        record = await fast.enqueue(task(max_attempts=2))
        [claim] = await fast.claim(["/gen"], "w")
        outcome = Outcome(claim.id, claim.token, TaskStatus.FAILURE, error="E: x", retry=True, retry_delay=0.1)
        assert await fast.finish([outcome]) == [True]
    # The retry is due 0.1 s after the failure by Redis's clock, not an hour later.
    deadline = time.monotonic() + 5
    while not (again := await honest.claim(["/gen"], "w")):
        assert time.monotonic() < deadline, "the retried task never fell due"
        await honest.wait_for_work(["/gen"], timeout=0.5)
    assert await honest.finish([Outcome(again[0].id, again[0].token, TaskStatus.SUCCESS)]) == [True]
    stored = await honest.get(record.id)
    for stamp in (stored.created_at, stored.started_at, stored.completed_at):
        assert stamp is not None and abs(stamp - time.time()) < 30


async def test_a_host_with_a_slow_clock_wakes_when_a_delayed_task_falls_due(
    two_hosts: tuple[RedisQueue, RedisQueue],
) -> None:
    honest, slow = two_hosts
    await honest.enqueue(task(run_at=time.time() + 0.3))
    with clock_off_by(-30):
        assert await slow.claim(["/gen"], "w") == []
        started = time.monotonic()
        await slow.wait_for_work(["/gen"], timeout=5)
        assert time.monotonic() - started < 2, "slept by its own clock, not until the task was due"
    assert len(await honest.claim(["/gen"], "w")) == 1
