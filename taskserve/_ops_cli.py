"""The operator's commands, against a running server: tasks, task, cancel, retry, queues, workers, submit.

They speak HTTP through ``SyncHTTPClient`` only (never the broker), so they work from any
machine that reaches the API. Tables come from ``rich``, which is imported only here.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .exceptions import TaskserveError

if TYPE_CHECKING:
    from rich.console import Console

    from .client.sync import SyncHTTPClient

DEFAULT_URL = "http://127.0.0.1:3000"
WAIT_CHUNK = 2.0  # seconds one wait of `submit` lasts, so that Ctrl-C is heard soon

_url = click.option(
    "--url",
    envvar="TASKSERVE_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="The taskserve server (env TASKSERVE_URL).",
)
# Kept on the click context rather than passed to each command: _client reads it.
_api_key = click.option(
    "--api-key",
    envvar="TASKSERVE_API_KEY",
    default=None,
    expose_value=False,
    callback=lambda ctx, _, value: ctx.meta.__setitem__(API_KEY, value),
    help="The server's API key, if it needs one (env TASKSERVE_API_KEY).",
)
API_KEY = "taskserve.api_key"


def url_option(fn: Any) -> Any:
    """``--url`` and ``--api-key``: where the server is and how to get in."""
    return _url(_api_key(fn))


json_option = click.option("--json", "as_json", is_flag=True, help="Print the server's JSON instead of a table.")


def _console(stderr: bool = False) -> Console:
    try:
        from rich.console import Console
    except ImportError:
        raise click.ClickException("This command draws tables with rich: pip install 'taskserve[cli]'.") from None
    # Wide enough that a task id is never cut, whatever the terminal.
    width = max(160, int(os.environ.get("COLUMNS", "0") or 0))
    return Console(stderr=stderr, width=width, soft_wrap=False)


@contextlib.contextmanager
def _client(url: str) -> Iterator[SyncHTTPClient]:
    """A client whose errors end the command with their message and a non-zero exit, not a traceback."""
    from .client.sync import SyncHTTPClient

    try:
        with SyncHTTPClient(url, api_key=click.get_current_context().meta.get(API_KEY)) as client:
            yield client
    except TaskserveError as exc:
        raise click.ClickException(str(exc)) from None


def _get(client: SyncHTTPClient, path: str, **params: Any) -> Any:
    return client._request("GET", path, None, params={k: v for k, v in params.items() if v is not None}).json()


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _table(title: str, columns: list[str]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name in columns:
        # Ids are never folded nor cut: they are what the next command is given.
        full = name in ("task id", "worker id", "retry of")
        table.add_column(name, no_wrap=full, overflow="fold")
    return table


def _when(iso: str | None) -> str:
    return "" if not iso else iso.replace("T", " ")[:19]


def register(cli: click.Group) -> None:
    """Add the commands to the ``taskserve`` group."""
    for command in (tasks, task, cancel, retry, queues, workers, submit):
        cli.add_command(command)


@click.command()
@url_option
@click.option("--route", default=None, help="Only this endpoint's tasks (its route or name).")
@click.option(
    "--status", default=None, type=click.Choice(["pending", "in_progress", "success", "failure", "cancelled"])
)
@click.option("--tag", default=None, metavar="KEY:VALUE", help="Only tasks so labelled.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--cursor", default=None, help="Start after this page (the cursor a previous page printed).")
@json_option
def tasks(
    url: str, route: str | None, status: str | None, tag: str | None, limit: int, cursor: str | None, as_json: bool
) -> None:
    """List tasks, newest first."""
    with _client(url) as client:
        page = _get(client, "/tasks", route=route, status=status, tag=tag, limit=limit, cursor=cursor)
    if as_json:
        _print_json(page)
        return
    table = _table("tasks", ["task id", "route", "status", "created", "attempts", "error"])
    for t in page["tasks"]:
        table.add_row(t["task_id"], t["route"], t["status"], _when(t["created_at"]), str(t["attempts"]), t["error"])
    console = _console()
    console.print(table)
    if page["next_cursor"]:
        console.print(f"More: taskserve tasks --cursor {page['next_cursor']}", soft_wrap=True)


@click.command()
@url_option
@click.argument("task_id")
@json_option
def task(url: str, task_id: str, as_json: bool) -> None:
    """Show one task: its status, progress, attempts and the error of each."""
    with _client(url) as client:
        status = _get(client, f"/tasks/{task_id}")
    if as_json:
        _print_json(status)
        return
    from rich.table import Table

    table = Table(show_header=False, title=f"task {status['task_id']}", title_justify="left")
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for key in ("task_id", "route", "status", "created_at", "started_at", "completed_at", "attempts", "error"):
        table.add_row(key, "" if status.get(key) is None else str(status[key]))
    for key in ("position", "workers", "warning", "retry_of", "worker", "batch_size"):
        if status.get(key) is not None:
            table.add_row(key, str(status[key]))
    for key in ("queue_time", "run_time"):
        if status.get(key) is not None:
            table.add_row(key, f"{status[key]:.3f} s")
    if status.get("tags"):
        table.add_row("tags", ", ".join(f"{k}:{v}" for k, v in status["tags"].items()))
    if status.get("progress"):
        table.add_row("progress", json.dumps(status["progress"]))
    console = _console()
    console.print(table)
    for i, error in enumerate(status.get("errors") or [], 1):
        what = f"{error.get('type') or 'Error'}: {error.get('message') or ''}"
        console.print(f"attempt {error.get('attempt', i)}, {_when(error.get('at'))}: {what}", markup=False)
        if error.get("traceback"):
            console.print(error["traceback"], markup=False, highlight=False, soft_wrap=True)


def _route_of(client: SyncHTTPClient, task_id: str) -> str:
    route: str = _get(client, f"/tasks/{task_id}")["route"]
    return route


@click.command()
@url_option
@click.argument("task_id")
def cancel(url: str, task_id: str) -> None:
    """Cancel a pending or running task."""
    with _client(url) as client:
        route = _route_of(client, task_id)
        body = client._request("POST", f"{route}/cancel", None, params={"task_id": task_id}).json()
    click.echo(f"{body['task_id']} {body['status']}")


@click.command()
@url_option
@click.argument("task_id")
def retry(url: str, task_id: str) -> None:
    """Run a finished task again with the same arguments; prints the new task's id."""
    with _client(url) as client:
        route = _route_of(client, task_id)
        body = client._request("POST", f"{route}/retry", None, params={"task_id": task_id}).json()
    click.echo(f"{body['task_id']} {body['status']} (retry of {body['retry_of']})")


@click.command()
@url_option
@json_option
def queues(url: str, as_json: bool) -> None:
    """Per route: what waits, what runs, the limits, and how fast it drains."""
    with _client(url) as client:
        body = _get(client, "/queues")
    if as_json:
        _print_json(body)
        return
    columns = ["route", "pending", "running", "success", "failure", "cancelled", "oldest wait (s)", "workers"]
    table = _table("queues", [*columns, "concurrency", "max queue", "done last min"])
    for q in body["queues"]:
        c = q["counts"]
        age = q["oldest_pending_age"]
        table.add_row(
            q["route"],
            *(str(c[s]) for s in ("pending", "in_progress", "success", "failure", "cancelled")),
            "" if age is None else f"{age:.1f}",
            str(q["workers"]),
            "" if q["concurrency"] is None else str(q["concurrency"]),
            "" if q["max_queue"] is None else str(q["max_queue"]),
            str(q["finished_last_minute"]),
        )
    _console().print(table)


@click.command()
@url_option
@json_option
def workers(url: str, as_json: bool) -> None:
    """The live workers of every host, with the tasks they run."""
    with _client(url) as client:
        body = _get(client, "/workers")
    if as_json:
        _print_json(body)
        return
    table = _table("workers", ["worker id", "host", "pid", "state", "routes", "concurrency", "gpus", "running"])
    for w in body["workers"]:
        table.add_row(
            w["id"],
            w["host"],
            str(w["pid"]),
            w["state"],
            " ".join(w["routes"]),
            str(w["concurrency"]),
            ",".join(w["gpus"]),
            "\n".join(w["running"]),
        )
    _console().print(table)


# -- submit ------------------------------------------------------------------------------


def _answered(output: Path) -> set[int]:
    """Lines of the input already answered in ``output``; a last line cut short by a crash is dropped."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        output.write_bytes(data)
    done = set()
    for raw in data.splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            done.add(int(json.loads(raw)["line"]))
    return done


def _result_json(response: Any) -> Any:
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return {"content_type": response.headers.get("content-type"), "base64": base64.b64encode(response.content).decode()}


def _run_line(
    client: SyncHTTPClient, info: Any, run: str, number: int, text: str, stop: threading.Event
) -> dict[str, Any]:
    from .client._map import as_arguments
    from .exceptions import QueueFull, ValidationFailed

    try:
        (kwargs,) = as_arguments(info, [json.loads(text)])
    except (ValueError, TypeError) as exc:
        return {"line": number, "task_id": None, "status": "rejected", "error": f"Not valid input: {exc}"}
    # Keyed by the output file, the line and its text: a task submitted by a run that was stopped
    # before it wrote the answer is found again (while retained), not run twice.
    key = f"submit-{run}-{number}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    endpoint = getattr(client, info.name).options(idempotency_key=key)
    while True:
        try:
            handle = endpoint.submit(**kwargs)
            break
        except ValidationFailed as exc:
            return {"line": number, "task_id": None, "status": "rejected", "error": str(exc)}
        except QueueFull as exc:  # the route's queue is full: wait as the server suggests
            if stop.wait(exc.retry_after or 1.0):
                raise
    while not handle.wait(WAIT_CHUNK).is_terminal:
        if stop.is_set():
            raise KeyboardInterrupt
    status = handle.status()
    out = {"line": number, "task_id": handle.id, "status": status["status"]}
    if status["status"] == "success":
        response = client._request("GET", f"{info.route}/get", handle, params={"task_id": handle.id})
        out["result"] = _result_json(response)
    else:
        out["error"] = status.get("error") or status["status"]
    return out


@click.command()
@url_option
@click.argument("route")
@click.argument("input_file", metavar="INPUT.jsonl", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--output",
    "-o",
    required=True,
    metavar="OUT.jsonl",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where answers go, one JSON object a line; lines already answered there are skipped.",
)
@click.option("--concurrency", default=16, show_default=True, type=click.IntRange(1, 1000), help="Tasks in flight.")
def submit(url: str, route: str, input_file: Path, output: Path, concurrency: int) -> None:
    """Run ROUTE on each line of INPUT.jsonl (a JSON object of arguments a line), writing OUT.jsonl.

    Run it again after a stop or a crash and it goes on with the lines not yet answered.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    lines = [
        (n, text)
        for n, text in enumerate(input_file.read_text().splitlines(), 1)
        if text.strip()  # blank lines are no task
    ]
    console = _console(stderr=True)
    with _client(url) as client:
        info = next((i for i in client.endpoints.values() if route in (i.name, i.route, "/" + i.name)), None)
        if info is None or not info.task:
            names = ", ".join(i.route for i in client.endpoints.values() if i.task)
            raise click.ClickException(f"No task endpoint {route!r} on {url}; it has {names}.")
        done = _answered(output)
        todo = [(n, text) for n, text in lines if n not in done]
        if not todo:
            console.print(f"All {len(lines)} lines are answered in {output}.")
            return
        stop = threading.Event()
        failed = 0
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        pool = concurrent.futures.ThreadPoolExecutor(concurrency)
        try:
            with output.open("a") as out, Progress(*columns, console=console) as bar:
                progress = bar.add_task(info.route, total=len(lines), completed=len(lines) - len(todo))
                run = hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:16]
                futures = [pool.submit(_run_line, client, info, run, n, text, stop) for n, text in todo]
                for future in concurrent.futures.as_completed(futures):
                    answer = future.result()
                    failed += answer["status"] != "success"
                    out.write(json.dumps(answer) + "\n")
                    out.flush()
                    bar.advance(progress)
        except KeyboardInterrupt:
            stop.set()
            raise click.ClickException("Stopped; run the same command again to go on where it stopped.") from None
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
    console.print(f"{len(todo)} lines answered in {output}, {failed} not successful.")
