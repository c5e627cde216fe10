"""The shared broker: ``redis://host:6379/0`` (or ``rediss://``), for API servers and workers on many hosts.

Every state change is one Lua script (``lua/*.lua``), so Redis itself makes it atomic: no
lock, no read-modify-write race between processes. Scripts take every timestamp from Redis's
clock (``TIME``) and callers pass durations, so hosts' clocks never meet. Every script is safe
to re-send, as redis-py does after a lost reply: a re-send finds the mark its first run left
(the enqueue or cancel request id, the claim token) and answers as the first run did. Keys,
under a prefix (``taskserve``, or ``?prefix=NAME`` so that several services or a test can
share one Redis):

    P:t:ID              hash: the task's fields, its args and its result; expires once terminal
    P:e:ID              stream: the task's event log, ids 0-1, 0-2, ...; expires with the hash
    P:o:ID              hash: a generator task's output items, number -> "TIME JSON", 'n' the last
    P:all               zset, all scores 0: every task id, lex order = age (listing, newest first)
    P:ix:ROUTE          the same for one route; ids of expired hashes leave on listing or sweep
    P:ixroutes          set of routes with a listing index (the sweep visits these)
    P:ox:OWNER          the same for one API key owner's tasks (access control); P:oxowners names them
    P:sweep             hash index key -> the id the last sweep of it stopped after
    P:ready:ROUTE       zset of due tasks: score -priority, member "run_at|ID" (ties by run_at)
    P:delayed:ROUTE     zset of tasks not due yet, scored by run_at; claim promotes the due ones
    P:leases:ROUTE      zset of running tasks, scored by lease expiry (recover, counts)
    P:w:WORKER          set of the tasks a worker holds (abandon)
    P:c:TOKEN           the ids one claim call took, for a re-send of it; expires with the lease
    P:timers            zset of active tasks with a TTL or deadline, by the earlier of the two
    P:webhooks          zset of ended tasks whose webhook is pending, by when the next try is due
    P:up:ID             large arguments on their way in, sent in chunks; the enqueue moves them into P:t:ID
    P:idem:ROUTE:KEY    the task an idempotency key names (KEY is "OWNER\x1fKEY" for an owner's); expires with it
    P:routes            set of routes with tasks (recover and counts visit these only)
    P:finished          hash "STATUS:ROUTE" -> tasks that ended so, counted where they end
    P:workers           hash worker id -> "LAST_SEEN WorkerInfo-JSON" (the worker registry)
    P:workers:ttl       zset of worker ids by heartbeat expiry; expired ones are dropped on read

Channels: ``P:work:ROUTE`` (new or re-queued work), ``P:cancel`` and ``P:done`` (task ids).
Durability is what Redis is configured for: use ``appendonly yes`` to survive a Redis crash.
Scripts touch keys they compute from the prefix, so this needs one Redis, not a Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import RedisError, ResponseError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("The Redis broker needs the redis package: pip install 'taskserve[redis]'.") from exc

from .._aio import wait_event
from .._splice import SpooledArgs
from .._types import (
    Claim,
    Event,
    NewTask,
    Result,
    TaskRecord,
    TaskStatus,
    WorkerInfo,
    event_id,
    unscoped_key,
)
from ..exceptions import IdempotencyConflict, QueueError, QueueFull, QueueUnavailable
from . import lifecycle
from .base import DEFAULT_RETENTION, WAIT_LEVELS, Queue, Watch, now, queue_full_message

logger = logging.getLogger("taskserve.queue")

RECORD_FIELDS = tuple(
    "route status created_at started_at completed_at attempts max_attempts error worker priority timeout run_at"
    " errors retry_of tags progress idempotency_key args_hash batch_size expires_at deadline purge_at webhook"
    " webhook_state webhook_attempts webhook_error owner".split()
)
# A page of a listing filtered by status looks at no more ids than this (the index is by age only).
LIST_WINDOW = 5000
MAX_CONNECTIONS = 100  # per process; more callers wait for a free connection (``?max_connections=``)
POOL_WAIT = 20.0  # seconds a caller waits for a free connection before QueueUnavailable
STAGED_FOR = 3600  # seconds large arguments sent ahead of their submit are kept if it never comes

# The Lua lives in lua/*.lua, read once at import; each script is the prelude plus its body.
SCRIPT_NAMES = (
    *("enqueue", "claim", "move", "extend", "lapsed", "counts", "heartbeat", "workers", "list", "sweep"),
    *("overdue", "position", "report", "webhooks", "waits"),
)


def _load_scripts() -> dict[str, str]:
    lua = importlib.resources.files(__package__) / "lua"
    prelude = (lua / "prelude.lua").read_text()
    return {name: prelude + (lua / f"{name}.lua").read_text() for name in SCRIPT_NAMES}


SCRIPTS = _load_scripts()


def _move_args(task_id: str, moves: list[lifecycle.Move], ts: float) -> list[Any]:
    """A task's moves as ``move.lua`` reads them: id, the result bytes, the moves as JSON."""
    result, encoded = b"", []
    for m in moves:
        fields: dict[str, Any] = {"to": m.to.value, "held": [s.value for s in m.held]}
        optional = {
            "token": m.token,
            "lapsed": m.lapsed or None,
            "left": m.attempts_left or None,
            "reason": m.reason,
            "delay": m.delay,
            "give": m.give_back_attempt or None,
            "etext": m.error_text,
            "ctype": m.content_type,
            # The start travels as an age by this host's clock; the script subtracts it from Redis's now.
            "age": None if m.started_at is None else max(0.0, ts - m.started_at),
            "batch": m.batch_size,
            "stamp": m.stamp,
            "tell": m.tells_holder or None,
        }
        fields.update((k, v) for k, v in optional.items() if v is not None)
        if m.error is not None:
            fields["etype"], fields["emsg"] = m.error
            if m.traceback is not None:
                fields["etb"] = m.traceback
        if m.result is not None:
            fields["result"], result = True, m.result
        encoded.append(fields)
    return [task_id, result, json.dumps(encoded)]


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)


def _record(task_id: str, values: Sequence[Any]) -> TaskRecord | None:
    """A hash written before a field existed reads back with that field's default."""
    (route, status, created, started, completed, attempts, max_attempts, error, worker, priority, timeout, run_at,
     errors, retry_of, tags, progress, key, args_hash, batch_size, expires_at, deadline, purge_at, webhook,
     webhook_state, webhook_attempts, webhook_error, owner) = (
        None if v is None else v.decode() for v in values
    )  # fmt: skip
    if route is None or status is None or created is None:
        return None
    return TaskRecord(
        id=task_id,
        route=route,
        status=TaskStatus(status),
        created_at=float(created),
        started_at=None if started is None else float(started),
        completed_at=None if completed is None else float(completed),
        attempts=int(attempts or 0),
        max_attempts=int(max_attempts or 1),
        error=error,
        worker=worker,
        priority=int(priority or 0),
        timeout=_float(timeout),
        run_at=_float(run_at),
        errors=[] if errors is None else json.loads(errors),
        retry_of=retry_of,
        tags={} if tags is None else json.loads(tags),
        progress=None if progress is None else json.loads(progress),
        idempotency_key=unscoped_key(key),
        args_hash=args_hash,
        batch_size=None if batch_size is None else int(batch_size),
        expires_at=_float(expires_at),
        deadline=_float(deadline),
        purge_at=_float(purge_at),
        webhook=webhook,
        webhook_state=webhook_state,
        webhook_attempts=int(webhook_attempts or 0),
        webhook_error=webhook_error,
        owner=owner,
    )


class _RedisWatch(Watch):
    """Wakes when ``P:done`` announces the task; the first wait also waits for the subscription."""

    def __init__(self, queue: RedisQueue, task_id: str) -> None:
        self._queue = queue
        self._task_id = task_id
        self._event = asyncio.Event()
        queue._waiters.setdefault(task_id, set()).add(self._event)
        queue._want([queue._key("done")])

    async def wait(self, timeout: float) -> None:
        subscribed = self._queue._want([self._queue._key("done")])[0]
        if not subscribed.done():
            # Return once the subscription is live, so that the caller's next read sees
            # every change that no message will announce.
            await asyncio.wait([subscribed], timeout=timeout)
            return
        await wait_event(self._event, timeout)
        self._event.clear()

    def close(self) -> None:
        events = self._queue._waiters.get(self._task_id)
        if events is not None:
            events.discard(self._event)
            if not events:
                del self._queue._waiters[self._task_id]


class RedisQueue(Queue):
    """The broker for many machines: ``redis://host:6379/0``, ``rediss://`` for TLS.

    Args:
        url: the Redis URL; redis-py options such as ``socket_connect_timeout`` may be
            given as query parameters, and ``prefix`` names the key prefix.
        retention: seconds a finished task and its result are kept (Redis expires them).
        prefix: the key prefix, ``taskserve`` unless the URL or this argument says otherwise.

    Example:
        >>> queue = RedisQueue("redis://localhost:6379/0?prefix=imagegen")
    """

    def __init__(self, url: str, *, retention: float = DEFAULT_RETENTION, prefix: str | None = None) -> None:
        super().__init__(url, retention=retention)
        parsed = urlparse(url)
        query = dict(parse_qsl(parsed.query))
        self.prefix = prefix or query.pop("prefix", None) or "taskserve"
        query.pop("retention", None)  # ours, not redis-py's
        options: dict[str, Any] = {
            "socket_connect_timeout": 5.0,
            "socket_timeout": 30.0,
            "max_connections": MAX_CONNECTIONS,
            **query,
        }
        # A short retry rides out a restart or a dropped connection; longer outages surface
        # as QueueUnavailable (HTTP 503) instead of hanging a request.
        # A blocking pool: past ``max_connections`` callers wait their turn for a connection
        # rather than fail with "Too many connections" (hundreds of concurrent long polls).
        pool = aioredis.BlockingConnectionPool.from_url(
            urlunparse(parsed._replace(query=urlencode(options))),
            timeout=POOL_WAIT,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            socket_keepalive=True,
            health_check_interval=30,
        )
        self._client = aioredis.Redis.from_pool(pool)
        self._scripts = {name: self._client.register_script(body) for name, body in SCRIPTS.items()}
        # Pushed changes make polling a safety net only, for messages lost while reconnecting.
        self.poll_cap = 5.0
        self._pubsub = self._client.pubsub()
        self._subscriptions: dict[str, asyncio.Future[None]] = {}  # resolved when Redis confirmed
        self._subscribe_lock = asyncio.Lock()
        self._listener: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._resubscribe = False  # set when a SUBSCRIBE failed, so the listener sends them all again
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._work = asyncio.Event()

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        """Turn redis-py's errors into ours at the boundary, so callers catch only taskserve's."""
        try:
            yield
        except ResponseError as exc:
            if str(exc).startswith("DUPLICATE"):
                raise QueueError(f"Task id {str(exc)[10:]!r} is already taken; give each task a new id.") from exc
            if str(exc).startswith("CONFLICT "):
                _, task_id, key = str(exc).split(" ", 2)
                raise IdempotencyConflict(unscoped_key(key) or key, task_id) from None
            if str(exc).startswith("FULL "):
                _, pending, cap, new, route = str(exc).split(" ", 4)
                message = queue_full_message(route, int(pending), int(cap), int(new))
                raise QueueFull(message, route=route, excess=int(pending) + int(new) - int(cap)) from None
            raise QueueUnavailable(f"Redis at {self.describe()} refused the operation: {exc}.") from exc
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(
                f"Cannot reach Redis at {self.describe()} ({exc}); check that it runs, taskserve reconnects by itself."
            ) from exc

    async def _run(self, script: str, *args: Any) -> Any:
        with self._translate():
            return await self._scripts[script](args=[self.prefix, *args])

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Check that Redis answers and that every subscription asked for so far is live."""
        await self._ping()
        pending = [f for f in self._subscriptions.values() if not f.done()]
        if pending and (await asyncio.wait(pending, timeout=5.0))[1]:
            raise QueueUnavailable(f"Redis at {self.describe()} did not confirm a subscription in time; retry later.")

    async def close(self) -> None:
        tasks = [t for t in (self._listener, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._listener, self._subscriptions = None, {}
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    # -- notifications ---------------------------------------------------------------------

    def _want(self, channels: Iterable[str]) -> list[asyncio.Future[None]]:
        """Subscribe in the background; the futures resolve once Redis confirms each channel."""
        channels = list(channels)
        new = [c for c in channels if c not in self._subscriptions]
        if new:
            loop = asyncio.get_running_loop()
            for channel in new:
                self._subscriptions[channel] = loop.create_future()
            if self._listener is None:
                self._listener = loop.create_task(self._listen())  # subscribes to all on start
            else:
                task = loop.create_task(self._subscribe(new))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        return [self._subscriptions[c] for c in channels]

    async def _subscribe(self, channels: list[str]) -> None:
        try:
            async with self._subscribe_lock:
                await self._pubsub.subscribe(*channels)
        except Exception:  # the listener retries every channel with back-off
            self._resubscribe = True

    async def _listen(self) -> None:
        """Read this process's messages for as long as it lives, reconnecting with back-off."""
        delay, lost = 0.05, False
        self._resubscribe = True
        while True:
            try:
                if self._resubscribe:
                    async with self._subscribe_lock:
                        self._resubscribe = False
                        await self._pubsub.subscribe(*self._subscriptions)
                message = await self._pubsub.get_message(timeout=5.0)
            except Exception as exc:  # RedisError, OSError, or redis-py's state errors mid-reconnect
                if not lost:
                    logger.warning("Lost the Redis subscription at %s (%s); reconnecting.", self.describe(), exc)
                    loop = asyncio.get_running_loop()
                    # Fresh futures, so that connect() waits until the subscriptions are back.
                    self._subscriptions = {
                        c: loop.create_future() if f.done() else f for c, f in self._subscriptions.items()
                    }
                lost = self._resubscribe = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if lost:
                logger.info("Redis subscription at %s is back.", self.describe())
                lost, delay = False, 0.05
                self._wake_all()  # messages sent while we were away are lost: make everyone look
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if not isinstance(message.get("channel"), bytes):
            return  # a pong
        channel = message["channel"].decode()
        if message["type"] == "subscribe":
            future = self._subscriptions.get(channel)
            if future is not None and not future.done():
                future.set_result(None)
        elif message["type"] != "message":
            return
        elif channel == self._key("done"):
            for event in self._waiters.get(message["data"].decode(), ()):
                event.set()
        elif channel == self._key("cancel"):
            try:
                self._notify_cancelled(message["data"].decode())
            except Exception:  # a listener's bug must not stop this process's notifications
                logger.exception("A cancel listener failed.")
        else:
            self._work.set()

    def _wake_all(self) -> None:
        self._work.set()
        for events in self._waiters.values():
            for event in events:
                event.set()

    def _watch(self, task_id: str) -> Watch:
        return _RedisWatch(self, task_id)

    def listen_for_cancel(self) -> None:
        """Call ``cancel_listeners`` when any process cancels a running task; ``connect()`` awaits it."""
        self._want([self._key("cancel")])

    async def _wait_for_work(self, routes: list[str], timeout: float) -> None:
        self.listen_for_cancel()
        deadline = now() + timeout
        fresh = any(self._key("work", r) not in self._subscriptions for r in routes)
        subscribed = [f for f in self._want([self._key("work", r) for r in routes]) if not f.done()]
        if subscribed:
            await asyncio.wait(subscribed, timeout=timeout)
        replies: list[Any] = []
        # Only a hint: with Redis away, sleep out the timeout and let the caller's claim report it.
        with contextlib.suppress(RedisError, OSError):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.time()  # run_at is on Redis's clock, so the wait until it is measured there too
                for route in routes:
                    pipe.zcard(self._key("ready", route))
                    pipe.zrange(self._key("delayed", route), 0, 0, withscores=True)
                replies = await pipe.execute()
        if not replies:
            replies = [(0, 0)]
        # Work queued before we listened sends no message; after that, messages tell us.
        if fresh and any(replies[1::2]):
            return
        seconds, micros = replies[0]
        redis_now = seconds + micros / 1e6
        wait = min([deadline - now(), *(delayed[0][1] - redis_now for delayed in replies[2::2] if delayed)])
        await wait_event(self._work, wait)
        self._work.clear()

    # -- hooks -----------------------------------------------------------------------------

    async def _ping(self) -> None:
        with self._translate():
            await self._client.ping()

    async def _enqueue(self, tasks: Sequence[NewTask], ts: float) -> dict[int, str]:
        staged = [self._key("up", t.id) for t in tasks if isinstance(t.args, SpooledArgs)]
        try:
            for t in tasks:
                if isinstance(t.args, SpooledArgs):
                    await self._stage(self._key("up", t.id), t.args)
            return await self._enqueue_rows(tasks, ts)
        except BaseException:
            if staged:  # the script takes the staged values it stores; these it never reached
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._client.delete(*staged))
            raise

    async def _stage(self, key: str, args: SpooledArgs) -> None:
        """Send large arguments a chunk at a time, as one request would need them whole in memory.

        The enqueue script moves them into the task; a submit that never gets that far leaves
        them to expire. Each chunk is written at its offset, not appended: redis-py re-sends a
        command whose reply was lost, and a re-sent APPEND would store its chunk twice.
        """
        with self._translate():
            at = 0
            for chunk in args.chunks():
                if at == 0:
                    await self._client.set(key, chunk, ex=STAGED_FOR)
                else:
                    await self._client.setrange(key, at, chunk)
                at += len(chunk)

    async def _enqueue_rows(self, tasks: Sequence[NewTask], ts: float) -> dict[int, str]:
        # run_at travels as a delay from this host's now, which the script adds to Redis's.
        args: list[Any] = [os.urandom(8).hex()]
        for t in tasks:
            timeout = "" if t.timeout is None else repr(float(t.timeout))
            delay = 0.0 if t.run_at is None else max(0.0, t.run_at - ts)
            expires = "" if t.expires_at is None else repr(t.expires_at - ts)
            deadline = "" if t.deadline is None else repr(t.deadline - ts)
            tags = json.dumps(t.tags) if t.tags else ""
            stored = b"" if isinstance(t.args, SpooledArgs) else t.args  # empty: staged at P:up:ID
            args += [t.id, t.route, t.priority, repr(delay), t.max_attempts, timeout, stored, tags]
            args += [t.retry_of or "", t.stored_key or "", t.args_hash or "", expires, deadline]
            args += [t.webhook or "", "" if t.max_queue is None else t.max_queue, t.trace or "", t.owner or ""]
        reply = await self._run("enqueue", *args)
        return {i: earlier.decode() for i, earlier in enumerate(reply[1:]) if earlier}

    async def _get(self, task_id: str) -> TaskRecord | None:
        with self._translate():
            values: list[Any] = await self._client.hmget(self._key("t", task_id), RECORD_FIELDS)
        return _record(task_id, values)

    async def _events(self, task_id: str) -> list[Event]:
        with self._translate():
            entries: Any = await self._client.xrange(self._key("e", task_id), "-", "+")
        return [
            Event(
                event_id(int(entry_id.split(b"-")[1])),
                fields[b"k"].decode(),
                json.loads(fields[b"d"]),
                float(fields[b"at"]),
            )
            for entry_id, fields in entries
        ]

    async def _list(
        self, route: str | None, status: str | None, limit: int, before: str | None, owner: str | None = None
    ) -> tuple[list[TaskRecord], str | None]:
        reply = await self._run(
            "list", route or "", status or "", limit, before or "", LIST_WINDOW, owner or "", *RECORD_FIELDS
        )
        width = len(RECORD_FIELDS) + 1
        records = []
        for i in range(1, len(reply), width):
            found = _record(reply[i].decode(), reply[i + 1 : i + width])
            if found is not None:
                records.append(found)
        return records, reply[0].decode() or None

    async def _get_args(self, task_id: str) -> bytes | None:
        with self._translate():
            args: Any = await self._client.hget(self._key("t", task_id), "args")
        return None if args is None else bytes(args)

    async def _get_result(self, task_id: str) -> Result | None:
        with self._translate():
            fields: list[Any] = await self._client.hmget(self._key("t", task_id), ["status", "result", "content_type"])
        status, body, content_type = fields
        if status != b"success" or body is None:
            return None
        return Result(body, content_type.decode() if content_type else "application/octet-stream")

    async def _claim(
        self, routes: list[str], worker: str, limit: int, lease: float, ts: float, min_priority: int | None
    ) -> list[Claim]:
        token = os.urandom(8).hex()
        ceiling = "+inf" if min_priority is None else str(-int(min_priority))  # ready scores are -priority
        caps = {r: self.caps[r] for r in routes if r in self.caps}
        rows = await self._run(
            "claim", worker, token, limit, repr(float(lease)), ceiling, json.dumps(caps) if caps else "", *routes
        )
        return [
            Claim(
                task_id.decode(),
                route.decode(),
                args,
                token,
                int(n),
                int(max_n),
                float(t) if t else None,
                int(pr),
                float(dl) if dl else None,
                float(due) if due else None,
                trace.decode() if trace else None,
            )
            for task_id, route, args, n, max_n, t, pr, dl, due, trace in rows
        ]

    async def _apply(self, items: list[tuple[str, list[lifecycle.Move]]], ts: float) -> list[bool]:
        args: list[Any] = [self._retention_ms()]
        for task_id, moves in items:
            args += _move_args(task_id, moves, ts)
        return [bool(a) for a in await self._run("move", *args)]

    async def _extend(self, held: dict[str, str], lease: float, ts: float) -> set[str]:
        pairs = [part for item in held.items() for part in item]
        kept = await self._run("extend", repr(float(lease)), *pairs)
        return {task_id.decode() for task_id in kept}

    async def _still_held(self, held: dict[str, str]) -> set[str]:
        with self._translate():
            async with self._client.pipeline(transaction=False) as pipe:
                for task_id in held:
                    pipe.hmget(self._key("t", task_id), ["status", "token"])
                replies = await pipe.execute()
        return {
            task_id
            for (task_id, token), (status, stored) in zip(held.items(), replies, strict=True)
            if status == b"in_progress" and stored == token.encode()
        }

    async def _report(
        self,
        task_id: str,
        token: str,
        progress: str | None,
        preview: tuple[bytes, str] | None,
        outputs: list[tuple[int, bytes]],
        ts: float,
    ) -> bool:
        image, image_type = preview if preview is not None else (b"", "")
        items = [part for seq, data in outputs for part in (seq, data)]
        return bool(await self._run("report", task_id, token, progress or "", image, image_type, *items))

    async def _outputs(self, task_id: str, after: int) -> list[tuple[int, bytes, float]]:
        key = self._key("o", task_id)
        with self._translate():
            top = int(await self._client.hget(key, "n") or 0)
            if top <= after:
                return []
            numbers = list(range(after + 1, min(top, after + 10_000) + 1))
            values: list[Any] = await self._client.hmget(key, [str(n) for n in numbers])
        out = []
        for n, value in zip(numbers, values, strict=True):
            if value is not None:
                at, _, data = bytes(value).partition(b" ")
                out.append((n, data, float(at)))
        return out

    async def _preview(self, task_id: str) -> Result | None:
        with self._translate():
            fields: list[Any] = await self._client.hmget(self._key("t", task_id), ["preview", "preview_type"])
        image, kind = fields
        if image is None:
            return None
        return Result(bytes(image), kind.decode() if kind else "application/octet-stream")

    async def _overdue(self, ts: float) -> list[tuple[str, str, float]]:
        flat = await self._run("overdue")
        return [(flat[i].decode(), flat[i + 1].decode(), float(flat[i + 2])) for i in range(0, len(flat), 3)]

    async def _position(self, record: TaskRecord, ts: float) -> int:
        return max(0, int(await self._run("position", record.id)))

    async def _lapsed(self, ts: float, worker: str | None) -> list[str]:
        return [i.decode() for i in await self._run("lapsed", worker or "")]

    async def _purge(self, ts: float) -> int:
        # Redis expires finished tasks by itself; the route set and the listing indexes need pruning.
        await self._run("counts", "prune")
        for _ in range(100):  # bounded: a store far larger than this is swept over several purges
            _, walked = await self._run("sweep", 5000)
            if walked:
                break
        return 0

    async def _counts(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for route, pending, running in await self._run("counts", ""):
            for status, n in (("pending", pending), ("in_progress", running)):
                if n:
                    out[(route.decode(), status)] = int(n)
        return out

    async def _longest_waits(self, routes: list[str]) -> dict[str, float]:
        flat = await self._run("waits", WAIT_LEVELS, *routes)
        return {flat[i].decode(): float(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def _take_webhooks(self, limit: int, lease: float, tries: int, ts: float) -> list[tuple[str, int]]:
        flat = await self._run("webhooks", "take", limit, repr(float(lease)), tries)
        return [(flat[i].decode(), int(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def _webhook_result(
        self, task_id: str, attempt: int, error: str | None, retry_in: float | None, ts: float
    ) -> bool:
        # An error is never empty here: '' tells the script the try was delivered.
        err = "" if error is None else (error or "error")
        retry = "" if retry_in is None else repr(float(retry_in))
        return bool(await self._run("webhooks", "settle", task_id, attempt, err, retry))

    def _retention_ms(self) -> int:
        return max(1, int(self.retention * 1000))

    async def _finished_counts(self) -> dict[tuple[str, str], int]:
        with self._translate():
            fields: dict[Any, Any] = await self._client.hgetall(self._key("finished"))
        out: dict[tuple[str, str], int] = {}
        for field, n in fields.items():
            status, _, route = bytes(field).decode().partition(":")
            out[(route, status)] = int(n)
        return out

    async def _heartbeat(self, info: WorkerInfo, ttl: float, ts: float) -> None:
        await self._run("heartbeat", info.id, repr(float(ttl)), info.dumps())

    async def _workers(self, ts: float) -> list[WorkerInfo]:
        flat = await self._run("workers")
        found = []
        for stored in flat[1::2]:
            last_seen, _, data = stored.partition(b" ")
            info = WorkerInfo.loads(data)
            info.last_seen = float(last_seen)
            found.append(info)
        return sorted(found, key=lambda w: w.id)

    async def _forget_worker(self, worker: str) -> None:
        with self._translate():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hdel(self._key("workers"), worker)
                pipe.zrem(self._key("workers", "ttl"), worker)
                await pipe.execute()
