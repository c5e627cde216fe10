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

This module holds the queue class and its script calls; the connection pool and the
pub/sub listener are in ``_redis_conn``, the scripts and their wire format in ``_redis_scripts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Sequence
from typing import Any

from .._splice import SpooledArgs
from .._types import Claim, Event, NewTask, Result, TaskRecord, WorkerInfo, event_id
from . import lifecycle
from ._redis_conn import RedisConnection
from ._redis_scripts import RECORD_FIELDS, SCRIPTS as SCRIPTS, decode_record, move_args
from .base import WAIT_LEVELS

# A page of a listing filtered by status looks at no more ids than this (the index is by age only).
LIST_WINDOW = 5000
STAGED_FOR = 3600  # seconds large arguments sent ahead of their submit are kept if it never comes


class RedisQueue(RedisConnection):
    """The broker for many machines: ``redis://host:6379/0``, ``rediss://`` for TLS.

    Args:
        url: the Redis URL; redis-py options such as ``socket_connect_timeout`` may be
            given as query parameters, and ``prefix`` names the key prefix.
        retention: seconds a finished task and its result are kept (Redis expires them).
        prefix: the key prefix, ``taskserve`` unless the URL or this argument says otherwise.

    Example:
        >>> queue = RedisQueue("redis://localhost:6379/0?prefix=imagegen")
    """

    async def _ping(self) -> None:
        with self._translate():
            await self._client.ping()

    async def _enqueue(self, tasks: Sequence[NewTask], ts: float) -> dict[int, str]:
        staged = {self._key("up", t.id): t.args for t in tasks if isinstance(t.args, SpooledArgs)}
        try:
            for key, args in staged.items():
                await self._stage(key, args)
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
        return decode_record(task_id, values)

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
            found = decode_record(reply[i].decode(), reply[i + 1 : i + width])
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
            args += move_args(task_id, moves, ts)
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
