"""The Redis queue's connections: the pool the scripts run on, and the subscription that hears other processes.

Apart from the script calls because this is the part with state and tasks of its own: one
pool of connections per process, and one pub/sub listener that subscribes on demand,
reconnects with back-off, wakes every waiter after an outage (messages sent meanwhile are
lost), and turns ``P:done``, ``P:cancel`` and ``P:work:ROUTE`` into wake-ups. The script
calls build on ``_run`` and ``_translate`` here and hold no state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator
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
from .._types import unscoped_key
from ..exceptions import IdempotencyConflict, QueueError, QueueFull, QueueUnavailable
from ._redis_scripts import SCRIPTS
from .base import DEFAULT_RETENTION, Queue, Watch, now, queue_full_message

logger = logging.getLogger("taskserve.queue")

MAX_CONNECTIONS = 100  # per process; more callers wait for a free connection (``?max_connections=``)
POOL_WAIT = 20.0  # seconds a caller waits for a free connection before QueueUnavailable


class _RedisWatch(Watch):
    """Wakes when ``P:done`` announces the task; the first wait also waits for the subscription."""

    def __init__(self, queue: RedisConnection, task_id: str) -> None:
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


class RedisConnection(Queue):
    """The part of ``RedisQueue`` that owns its connections; see ``RedisQueue`` for the arguments."""

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
