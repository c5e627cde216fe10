"""What the commands that start processes (serve, worker, run-worker) share.

Their common options (the broker, leases, logging), the option types, how many workers to
start on which GPUs, and the checks on the broker and the runtime directory live here once,
so that ``serve`` and ``worker`` cannot drift apart on any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

import click

DEFAULT_BROKER = "sqlite:///taskserve.db"
SHUTDOWN_REQUESTS = 5  # seconds open requests get at shutdown before they are cancelled
logger = logging.getLogger("taskserve")
T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (the API and workers spend their time in the loop)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def setup_logging(options: dict[str, Any]) -> None:
    from . import _logging

    _logging.setup(options.pop("log_level"), options.pop("log_format"))


def setup_tracing() -> None:
    from .tracing import configure

    configure()


def common_options(fn: Any) -> Any:
    options = [
        click.argument("target"),
        click.option(
            "--broker",
            envvar="TASKSERVE_BROKER",
            default=DEFAULT_BROKER,
            show_default=True,
            help="sqlite:///path/tasks.db or redis://host:port/db (env TASKSERVE_BROKER).",
        ),
        click.option(
            "--concurrency",
            default=1,
            show_default=True,
            type=click.IntRange(min=1),
            help="Tasks each worker process runs at once.",
        ),
        click.option(
            "--lease",
            default=30.0,
            show_default=True,
            type=click.FloatRange(min=0.1),
            envvar="TASKSERVE_LEASE",
            help="Seconds before a silent worker's task runs again.",
        ),
        click.option(
            "--grace",
            default=30.0,
            show_default=True,
            type=click.FloatRange(min=0),
            help="Seconds running tasks get to finish at shutdown.",
        ),
        click.option(
            "--retention",
            default=None,
            type=click.FloatRange(min=0),
            envvar="TASKSERVE_RETENTION",
            help="Seconds finished tasks and results are kept [default: 86400].",
        ),
        click.option(
            "--log-level",
            default="info",
            type=click.Choice(["debug", "info", "warning", "error"]),
            show_default=True,
            envvar="TASKSERVE_LOG_LEVEL",
        ),
        click.option(
            "--log-format",
            default="text",
            type=click.Choice(["text", "json"]),
            show_default=True,
            envvar="TASKSERVE_LOG_FORMAT",
            help="json: one JSON object a line: time, level, logger, message, traceback (env TASKSERVE_LOG_FORMAT).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def gpus_option(fn: Any) -> Any:
    return click.option(
        "--gpus",
        default=None,
        metavar="IDS",
        help="GPU ids to spread the workers over, like 0,1 [default: CUDA_VISIBLE_DEVICES, else nvidia-smi -L].",
    )(fn)


def lock_timeout_option(fn: Any) -> Any:
    return click.option(
        "--lock-timeout",
        default=5.0,
        show_default=True,
        type=click.FloatRange(min=0),
        help="SQLite: kill and replace a worker holding the store's write lock this many seconds "
        "(frozen: every write waits on it); 0 never does.",
    )(fn)


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_SIZE_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30})


class ByteSize(click.ParamType[int]):
    """A number of bytes: 500000, 100MB, 1.5GB, 512MiB."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace(" ", "")
        number = text.rstrip("kmgib")
        unit = text[len(number) :]
        try:
            if unit not in _SIZE_UNITS or float(number) < 0:
                raise ValueError
            return int(float(number) * _SIZE_UNITS[unit])
        except ValueError:
            self.fail(f"{value!r} is not a size: write bytes, or a number with kB, MB, GB (or KiB, MiB, GiB).")


def worker_plan(service: Any, workers: int | None, gpus: str | None) -> tuple[int, list[list[str]] | None]:
    """How many workers to start and the GPU ids of each (None: leave CUDA_VISIBLE_DEVICES alone).

    A service with ``resources={"gpu": N}`` gets one worker per N GPUs found (fewer if
    ``--workers`` says so); asking for more than there are stops start-up, naming the numbers.
    """
    from . import devices

    per_worker = service.gpus_per_worker
    if workers == 0:
        return 0, None
    if per_worker <= 0:
        count = service.workers if workers is None else workers
        return count, None if gpus is None else [devices.discover(gpus)[0]] * count
    found, source = devices.discover(gpus)
    if not found and getattr(service, "runs_without_gpus", False):
        count = service.workers if workers is None else workers
        logger.warning(
            "The service asks for %g GPU(s) per worker, but no GPU was found (from %s): "
            "its %d worker(s) run without one, as BentoML's would.",
            per_worker,
            source,
            count,
        )
        return count, None
    try:
        plan = devices.assign(per_worker, found, workers, source)
    except devices.DeviceError as exc:
        raise click.ClickException(str(exc)) from None
    return len(plan), plan


@contextlib.contextmanager
def worker_metrics_dir(broker: str, wanted: bool) -> Generator[str | None, None, None]:
    """The workers' private PROMETHEUS_MULTIPROC_DIR, removed when we stop (swept at start after a kill -9)."""
    from . import _runtime

    if not wanted:
        yield None
        return
    with _runtime.scratch_dir(_runtime.store_key(broker), _runtime.METRICS) as path:
        yield path


def open_queue(broker: str, retention: float | None, busy_timeout: float | None = None) -> Any:
    from .queue import Queue

    options: dict[str, Any] = {} if retention is None else {"retention": retention}
    if busy_timeout is not None and broker.startswith("sqlite:"):
        options["busy_timeout"] = busy_timeout
    try:
        return Queue.from_url(broker, **options)
    except (ValueError, ImportError) as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from None
    except PermissionError as exc:  # a runtime directory that is not ours (see _runtime)
        raise click.ClickException(str(exc)) from None


def check_runtime_dir(broker: str) -> None:
    """Refuse a foreign runtime directory here, once and clearly, rather than in every worker; sweep."""
    from . import _runtime

    try:
        _runtime.check_private(_runtime.runtime_dir(_runtime.store_key(broker)))
        _runtime.sweep_all()  # what processes killed earlier left, of any store
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from None
    except _runtime.RuntimeDirError as exc:
        raise click.ClickException(str(exc)) from None


@contextlib.contextmanager
def stop_signals(on_signal: Any) -> Generator[None, None, None]:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
