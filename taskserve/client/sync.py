"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
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
from ._transport import STREAM, default_transport


class Task:
    """A handle on one submitted task.

    Example:
        >>> task = client.generate.submit(prompt="a mountain")
        >>> if task.wait(timeout=30) is TaskStatus.SUCCESS:
        ...     image = task.get()
    """

    def __init__(self, endpoint: SyncEndpoint, task_id: str) -> None:
        self.endpoint = endpoint
        self.id = task_id

    def __repr__(self) -> str:
        return f"<Task {self.endpoint.info.name} {self.id}>"

    def _request(self, method: str, action: str, **params: Any) -> httpx.Response:
        return self.endpoint.client._request(
            method, f"{self.endpoint.info.route}/{action}", self, params={"task_id": self.id, **params}
        )

    def status(self) -> dict[str, Any]:
        """The full status record: ``status``, timestamps, ``attempts``, ``error``."""
        data: dict[str, Any] = self._request("GET", "status").json()
        return data

    def get_status(self) -> TaskStatus:
        """The task's current state."""
        return TaskStatus(self.status()["status"])

    def get(self, timeout: float | None = None) -> Any:
        """The decoded result; with ``timeout``, wait for it that long first.

        Raises:
            TaskNotReady: it has not finished.
            TaskFailed: it failed; the message is the remote ``Type: message``.
            TaskCancelled: it was cancelled.
        """
        if timeout is not None:
            self.wait(timeout)
        return decode_result(self.endpoint.info, self._request("GET", "get"))

    def wait(self, timeout: float = 60.0, on_progress: Callable[[dict[str, Any]], Any] | None = None) -> TaskStatus:
        """Block until the task ends or ``timeout`` seconds pass; returns its state then.

        ``on_progress`` is called with each new progress the task reports meanwhile
        (``fraction``, ``message``, ``at``, ``preview``), and with the last one before returning.
        """
        deadline = time.monotonic() + timeout
        chunk, seen = (PROGRESS_POLL, None) if on_progress is not None else (WAIT_CHUNK, None)
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            body = self._request("GET", "wait", timeout=min(remaining, chunk)).json()
            if on_progress is not None:
                changed, seen = progress_changed(body, seen)
                if changed:
                    on_progress(body["progress"])
            status = TaskStatus(body["status"])
            if status.is_terminal or remaining <= 0:
                return status

    def events(self) -> Iterator[TaskEvent]:
        """The task's events as they happen: ``status``, ``progress`` and ``output`` (each item a
        generator task yields), ending with its terminal status. A broken connection is resumed
        where it stopped, so no output item is lost or repeated.

        Example:
            >>> for event in client.chat.submit(prompt="hi").events():
            ...     if event.kind == "output":
            ...         print(event.data, end="")
        """
        client, last, tries = self.endpoint.client, "", 0
        path = f"{self.endpoint.info.route}/events"
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with client._http.stream(
                    "GET",
                    path,
                    params={"task_id": self.id},
                    headers=headers,
                    timeout=httpx.Timeout(None, connect=10.0),
                    extensions={STREAM: True},
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise_for_response(response, self)
                    parser = SSEParser()
                    for line in response.iter_lines():
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
            time.sleep(min(0.1 * 2**tries, 2.0))  # the stream broke or the server went away: resume

    def retry(self, **overrides: Any) -> Task:
        """Submit a new task with this one's arguments, ``overrides`` in place of some (it must have ended).

        The new task names this one in its status's ``retry_of``; the merged arguments are
        validated as a submit's are (``ValidationFailed``).

        Example:
            >>> again = task.retry(prompt="a calmer sea")
        """
        response = self.endpoint.client._request(
            "POST", f"{self.endpoint.info.route}/retry", self, params={"task_id": self.id}, **retry_body(overrides)
        )
        return Task(self.endpoint, response.json()["task_id"])

    def cancel(self) -> TaskStatus:
        """Cancel the task: a pending one never runs, a running one is stopped."""
        return TaskStatus(self._request("PUT", "cancel").json()["status"])


class SyncEndpoint:
    def __init__(self, client: SyncHTTPClient, info: EndpointInfo, params: list[tuple[str, str]] | None = None) -> None:
        self.client = client
        self.info = info
        self.params = params or []  # submit options, sent as query parameters

    def options(self, **options: Any) -> SyncEndpoint:
        """This endpoint with options for the tasks it submits (the decorator's stay the default).

        Args:
            priority: higher is claimed first.
            delay: seconds (or a ``timedelta``) before the task may start; or ``run_at``, a
                ``datetime`` or ISO 8601 string.
            ttl: seconds the task may wait to start; later it fails ``Expired`` without running.
            timeout: seconds an attempt may run before it is stopped (``TimeoutError``).
            deadline: a ``datetime`` (or ISO 8601 string), or seconds from now, by which the
                task must have finished, queued or running (``DeadlineExceeded``).
            idempotency_key: the same key with the same arguments returns the same task
                (a retried request queues nothing twice); with other arguments,
                ``IdempotencyConflict``.
            webhook: a URL called when the task ends.
            tags: labels, ``{"team": "search"}``, shown in the task's status.

        Example:
            >>> task = client.render.options(priority=5, delay=60, tags={"user": "42"}).submit(prompt="a cat")
        """
        return SyncEndpoint(self.client, self.info, option_params(self.params, **options))

    def __call__(self, **kwargs: Any) -> Any:
        """Run it and return the result (a task is submitted and awaited by the server)."""
        with request_arguments(kwargs) as body:
            response = self.client._request("POST", self.info.route, None, **body, params=self.params, timeout=None)
        return decode_result(self.info, response)

    def submit(self, **kwargs: Any) -> Task:
        """Queue the task; returns at once with a handle."""
        self._need_task()
        with request_arguments(kwargs) as body:
            data = self.client._request("POST", f"{self.info.route}/submit", None, **body, params=self.params).json()
        return Task(self, data["task_id"])

    def submit_many(self, items: list[dict[str, Any]]) -> list[Task]:
        """Queue many tasks at once, all or none, in order."""
        self._need_task()
        payload = [encode_json_item(item) for item in items]
        data = self.client._request(
            "POST", f"{self.info.route}/submit_many", None, json=payload, params=self.params
        ).json()
        return [Task(self, t["task_id"]) for t in data["tasks"]]

    def task(self, task_id: str) -> Task:
        """A handle on an existing task of this endpoint, by id."""
        return Task(self, task_id)

    def map(self, items: Iterable[Any], *, as_completed: bool = False, progress: bool = False) -> Iterator[Any]:
        """Run the task on every item and yield the results, in input order unless ``as_completed``.

        Submits in bulk and waits in bulk, so N tasks cost about N / 100 requests. A task that
        failed or was cancelled yields its exception (``TaskFailed``, ``TaskCancelled``) in place
        of its result, so one bad item never costs the others their results. Work starts when
        the iteration does.

        Args:
            items: one dict of arguments per task; for an endpoint with a single parameter, a
                bare value is that parameter (a dict is always taken as arguments).
            as_completed: yield each result as its task ends, not in input order.
            progress: draw a progress bar (needs ``rich``: ``pip install 'taskserve[progress]'``).

        Returns:
            An iterator of results, or exception instances for the tasks that did not succeed.

        Raises:
            ValidationFailed: an item's arguments are invalid (items of earlier chunks of 1,000
                are queued by then).
            TypeError: a bare value for an endpoint that takes more than one parameter.

        Example:
            >>> for result in client.embed.map([{"text": t} for t in texts], progress=True):
            ...     if isinstance(result, Exception):
            ...         print("failed:", result)
        """
        self._need_task()
        return self._map(as_arguments(self.info, items), as_completed, progress)

    def _map(self, arguments: list[dict[str, Any]], as_completed: bool, progress: bool) -> Iterator[Any]:
        run = MapRun(self.info, len(arguments), not as_completed, self.task)
        run.queue_chunks(arguments)
        bar = progress_bar(progress, self.info.name, run.total)
        try:
            while not run.done:
                if run.unsent:
                    start, chunk = run.unsent[0]
                    try:
                        answer = self.client._request(
                            "POST",
                            f"{self.info.route}/submit_many",
                            None,
                            json=[encode_json_item(item) for item in chunk],
                            params=chunk_params(self.params, start),
                        ).json()
                    except QueueFull as full:
                        pause = run.refused(full)
                        if pause and not run.open:
                            time.sleep(pause)
                        if not pause or not run.open:
                            continue
                    else:
                        run.unsent.popleft()
                        run.submitted(start, answer)
                        continue
                run.check()
                if run.open:
                    before = len(run.open)
                    self._map_wait(run)
                    bar.advance(before - len(run.open))
                yield from run.take()
        finally:
            bar.close()

    def _map_wait(self, run: MapRun) -> None:
        if self.info.wait_many is None:  # a server without the bulk route: one task at a time
            task = self.task(next(iter(run.open)))
            if task.wait(POLL).is_terminal:
                run.settle(task.id, self._outcome(task))
            return
        body = run.wait_body()
        answer = self.client._request("POST", self.info.wait_many, None, json=body, timeout=POLL + 30).json()
        for task_id, _ in run.absorb(answer):
            run.settle(task_id, self._outcome(self.task(task_id)))

    def _outcome(self, task: Task) -> Any:
        try:
            return task.get()
        except (TaskFailed, TaskCancelled, TaskNotReady, TaskNotFound) as exc:
            return exc

    def _need_task(self) -> None:
        if not self.info.task:
            raise ClientError(f"{self.info.name!r} is an @api endpoint, not a task; call it directly.")


class SyncHTTPClient:
    """A blocking client; endpoints appear as attributes, learned from ``GET /schema.json``.

    Args:
        url: the server, like ``http://localhost:3000``.
        timeout: seconds for each request (long polls add their own wait).
        transport: an httpx transport, for tests or embedding. By default ``PoolsTransport``,
            several small pools, so that one client shared by many threads keeps its throughput.
        headers: sent with every request.
        api_key: the server's API key, sent as ``Authorization: Bearer KEY``; by default
            ``TASKSERVE_API_KEY`` from the environment. Without the right one, ``AuthenticationError``.

    Example:
        >>> with taskserve.SyncHTTPClient("http://localhost:3000") as client:
        ...     task = client.generate.submit(prompt="a mountain")
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        headers: dict[str, str] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        transport = transport if transport is not None else default_transport()
        headers = auth_headers(headers, api_key)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport, headers=headers)
        self._endpoints: dict[str, EndpointInfo] | None = None

    def _request(self, method: str, path: str, task: Any, **kwargs: Any) -> httpx.Response:
        request_timeout(kwargs)
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise transport_error(self.url, exc) from exc
        raise_for_response(response, task)
        return response

    @property
    def endpoints(self) -> dict[str, EndpointInfo]:
        if self._endpoints is None:
            self._endpoints = parse_schema(self._request("GET", "/schema.json", None).json())
        return self._endpoints

    def __getattr__(self, name: str) -> SyncEndpoint:
        if name.startswith("_"):
            raise AttributeError(name)
        info = self.endpoints.get(name)
        if info is None:
            raise AttributeError(
                f"The service at {self.url} has no endpoint {name!r}; it has {sorted(self.endpoints)}."
            )
        return SyncEndpoint(self, info)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SyncHTTPClient:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
