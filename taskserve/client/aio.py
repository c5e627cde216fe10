"""The asyncio client, in lockstep with the blocking one in ``sync.py``."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any

import httpx

from .._types import TaskStatus
from ..exceptions import ClientError, QueueFull, TaskCancelled, TaskFailed, TaskNotFound, TaskNotReady
from ._base import (
    DEFAULT_TIMEOUT,
    PROGRESS_POLL,
    RECONNECTS,
    WAIT_CHUNK,
    EndpointInfo,
    SSEParser,
    TaskEvent,
    auth_headers,
    decode_result,
    encode_json_item,
    option_params,
    parse_schema,
    progress_changed,
    raise_for_response,
    request_arguments,
    request_timeout,
    retry_body,
    transport_error,
)
from ._map import POLL, MapRun, as_arguments, chunk_params, progress_bar
from ._transport import STREAM, default_async_transport


class AsyncTask:
    """A handle on one submitted task; the awaitable twin of ``Task``.

    Example:
        >>> task = await client.generate.submit(prompt="a mountain")
        >>> status = await task.wait(timeout=30)
    """

    def __init__(self, endpoint: AsyncEndpoint, task_id: str) -> None:
        self.endpoint = endpoint
        self.id = task_id

    def __repr__(self) -> str:
        return f"<AsyncTask {self.endpoint.name} {self.id}>"

    async def _request(self, method: str, action: str, **params: Any) -> httpx.Response:
        route = (await self.endpoint.info()).route
        return await self.endpoint.client._request(
            method, f"{route}/{action}", self, params={"task_id": self.id, **params}
        )

    async def status(self) -> dict[str, Any]:
        """The full status record: ``status``, timestamps, ``attempts``, ``error``."""
        data: dict[str, Any] = (await self._request("GET", "status")).json()
        return data

    async def get_status(self) -> TaskStatus:
        """The task's current state."""
        return TaskStatus((await self.status())["status"])

    async def get(self, timeout: float | None = None) -> Any:
        """The decoded result; raises ``TaskNotReady``, ``TaskFailed`` or ``TaskCancelled``."""
        if timeout is not None:
            await self.wait(timeout)
        return decode_result(await self.endpoint.info(), await self._request("GET", "get"))

    async def wait(
        self, timeout: float = 60.0, on_progress: Callable[[dict[str, Any]], Any] | None = None
    ) -> TaskStatus:
        """Wait until the task ends or ``timeout`` seconds pass; returns its state then.

        ``on_progress`` is called (or awaited, if it returns an awaitable) with each new progress.
        """
        deadline = time.monotonic() + timeout
        chunk, seen = (PROGRESS_POLL, None) if on_progress is not None else (WAIT_CHUNK, None)
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            body = (await self._request("GET", "wait", timeout=min(remaining, chunk))).json()
            if on_progress is not None:
                changed, seen = progress_changed(body, seen)
                if changed and inspect.isawaitable(called := on_progress(body["progress"])):
                    await called
            status = TaskStatus(body["status"])
            if status.is_terminal or remaining <= 0:
                return status

    async def events(self) -> AsyncIterator[TaskEvent]:
        """The task's events as they happen, resumed after a broken connection; as ``Task.events``.

        Example:
            >>> async for event in (await client.chat.submit(prompt="hi")).events():
            ...     print(event.kind, event.data)
        """
        client, last, tries = self.endpoint.client, "", 0
        path = f"{(await self.endpoint.info()).route}/events"
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                async with client._http.stream(
                    "GET",
                    path,
                    params={"task_id": self.id},
                    headers=headers,
                    timeout=httpx.Timeout(None, connect=10.0),
                    extensions={STREAM: True},
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise_for_response(response, self)
                    parser = SSEParser()
                    async for line in response.aiter_lines():
                        event = parser.feed(line)
                        if event is None:
                            continue
                        last, tries = event.id, 0
                        yield event
                        if event.final:
                            return
            except httpx.TransportError as exc:
                tries += 1
                if tries > RECONNECTS:
                    raise transport_error(client.url, exc) from exc
            await asyncio.sleep(min(0.1 * 2**tries, 2.0))

    async def retry(self, **overrides: Any) -> AsyncTask:
        """Submit a new task with this one's arguments, ``overrides`` in place of some (it must have ended).

        The new task names this one in its status's ``retry_of``; the merged arguments are
        validated as a submit's are (``ValidationFailed``).
        """
        route = (await self.endpoint.info()).route
        response = await self.endpoint.client._request(
            "POST", f"{route}/retry", self, params={"task_id": self.id}, **retry_body(overrides)
        )
        return AsyncTask(self.endpoint, response.json()["task_id"])

    async def cancel(self) -> TaskStatus:
        """Cancel the task: a pending one never runs, a running one is stopped."""
        return TaskStatus((await self._request("PUT", "cancel")).json()["status"])


class AsyncEndpoint:
    def __init__(self, client: AsyncHTTPClient, name: str, params: list[tuple[str, str]] | None = None) -> None:
        self.client = client
        self.name = name
        self.params = params or []  # submit options, sent as query parameters

    def options(self, **options: Any) -> AsyncEndpoint:
        """This endpoint with options for the tasks it submits; as ``SyncEndpoint.options``."""
        return AsyncEndpoint(self.client, self.name, option_params(self.params, **options))

    async def info(self) -> EndpointInfo:
        endpoints = await self.client.endpoints()
        if self.name not in endpoints:
            raise AttributeError(
                f"The service at {self.client.url} has no endpoint {self.name!r}; it has {sorted(endpoints)}."
            )
        return endpoints[self.name]

    async def __call__(self, **kwargs: Any) -> Any:
        """Run it and return the result (a task is submitted and awaited by the server)."""
        info = await self.info()
        with request_arguments(kwargs) as body:
            response = await self.client._request("POST", info.route, None, **body, params=self.params, timeout=None)
        return decode_result(info, response)

    async def submit(self, **kwargs: Any) -> AsyncTask:
        """Queue the task; returns at once with a handle."""
        info = await self._task_info()
        with request_arguments(kwargs) as body:
            response = await self.client._request("POST", f"{info.route}/submit", None, **body, params=self.params)
        return AsyncTask(self, response.json()["task_id"])

    async def submit_many(self, items: list[dict[str, Any]]) -> list[AsyncTask]:
        """Queue many tasks at once, all or none, in order."""
        info = await self._task_info()
        payload = [encode_json_item(item) for item in items]
        response = await self.client._request(
            "POST", f"{info.route}/submit_many", None, json=payload, params=self.params
        )
        return [AsyncTask(self, t["task_id"]) for t in response.json()["tasks"]]

    def task(self, task_id: str) -> AsyncTask:
        """A handle on an existing task of this endpoint, by id."""
        return AsyncTask(self, task_id)

    def map(self, items: Iterable[Any], *, as_completed: bool = False, progress: bool = False) -> AsyncIterator[Any]:
        """Run the task on every item and yield the results, in input order unless ``as_completed``.

        The awaitable twin of ``SyncEndpoint.map``: bulk submit, bulk wait (about N / 100
        requests for N tasks), and a failed or cancelled task yields its exception in place of
        its result. Work starts when the iteration does.

        Args:
            items: one dict of arguments per task; for an endpoint with a single parameter, a
                bare value is that parameter (a dict is always taken as arguments).
            as_completed: yield each result as its task ends, not in input order.
            progress: draw a progress bar (needs ``rich``: ``pip install 'taskserve[progress]'``).

        Returns:
            An async iterator of results, or exception instances for the tasks that did not succeed.

        Raises:
            ValidationFailed: an item's arguments are invalid (items of earlier chunks of 1,000
                are queued by then).
            TypeError: a bare value for an endpoint that takes more than one parameter.

        Example:
            >>> async for result in client.embed.map(texts, as_completed=True):
            ...     print(result)
        """
        return self._map(list(items), as_completed, progress)

    async def _map(self, items: list[Any], as_completed: bool, progress: bool) -> AsyncIterator[Any]:
        info = await self._task_info()
        arguments = as_arguments(info, items)
        run = MapRun(info, len(arguments), not as_completed, self.task)
        run.queue_chunks(arguments)
        bar = progress_bar(progress, info.name, run.total)
        try:
            while not run.done:
                if run.unsent:
                    start, chunk = run.unsent[0]
                    payload = [encode_json_item(item) for item in chunk]
                    try:
                        response = await self.client._request(
                            "POST",
                            f"{info.route}/submit_many",
                            None,
                            json=payload,
                            params=chunk_params(self.params, start),
                        )
                    except QueueFull as full:  # see MapRun.refused
                        pause = run.refused(full)
                        if pause and not run.open:
                            await asyncio.sleep(pause)
                        if not pause or not run.open:
                            continue
                    else:
                        run.unsent.popleft()
                        run.submitted(start, response.json())
                        continue
                run.check()
                if run.open:
                    before = len(run.open)
                    await self._map_wait(info, run)
                    bar.advance(before - len(run.open))
                for result in run.take():
                    yield result
        finally:
            bar.close()

    async def _map_wait(self, info: EndpointInfo, run: MapRun) -> None:
        if info.wait_many is None:  # a server without the bulk route: one task at a time
            task = self.task(next(iter(run.open)))
            if (await task.wait(POLL)).is_terminal:
                run.settle(task.id, await self._outcome(task))
            return
        response = await self.client._request("POST", info.wait_many, None, json=run.wait_body(), timeout=POLL + 30)
        fetch = [self.task(task_id) for task_id, _ in run.absorb(response.json())]
        for task, outcome in zip(fetch, await asyncio.gather(*(self._outcome(t) for t in fetch)), strict=True):
            run.settle(task.id, outcome)

    async def _outcome(self, task: AsyncTask) -> Any:
        try:
            return await task.get()
        except (TaskFailed, TaskCancelled, TaskNotReady, TaskNotFound) as exc:
            return exc

    async def _task_info(self) -> EndpointInfo:
        info = await self.info()
        if not info.task:
            raise ClientError(f"{info.name!r} is an @api endpoint, not a task; call it directly.")
        return info


class AsyncHTTPClient:
    """An asyncio client; endpoints appear as attributes, learned from ``GET /schema.json``.

    Args:
        url: the server, like ``http://localhost:3000``.
        timeout: seconds for each request (long polls add their own wait).
        transport: an httpx async transport, e.g. ``httpx.ASGITransport(app)`` in tests. By default
            aiohttp's (with ``taskserve[aiohttp]``), else ``AsyncPoolsTransport``: both keep their
            throughput when hundreds of coroutines share the client, which one httpx pool does not.
        headers: sent with every request.
        api_key: the server's API key, sent as ``Authorization: Bearer KEY``; by default
            ``TASKSERVE_API_KEY`` from the environment. Without the right one, ``AuthenticationError``.

    Example:
        >>> async with taskserve.AsyncHTTPClient("http://localhost:3000") as client:
        ...     task = await client.generate.submit(prompt="a mountain")
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: dict[str, str] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        transport = transport if transport is not None else default_async_transport()
        headers = auth_headers(headers, api_key)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=transport, headers=headers)
        self._endpoints: dict[str, EndpointInfo] | None = None

    async def _request(self, method: str, path: str, task: Any, **kwargs: Any) -> httpx.Response:
        request_timeout(kwargs)
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise transport_error(self.url, exc) from exc
        raise_for_response(response, task)
        return response

    async def endpoints(self) -> dict[str, EndpointInfo]:
        if self._endpoints is None:
            self._endpoints = parse_schema((await self._request("GET", "/schema.json", None)).json())
        return self._endpoints

    def __getattr__(self, name: str) -> AsyncEndpoint:
        if name.startswith("_"):
            raise AttributeError(name)
        return AsyncEndpoint(self, name)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncHTTPClient:
        try:
            await self.endpoints()
        except BaseException:
            # __aexit__ is not called when __aenter__ fails (a refused key, a server away): close here.
            await self.aclose()
            raise
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()
