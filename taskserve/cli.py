"""The ``taskserve`` command: the group that gathers every command, and the console script's entry.

The commands themselves live by what they do: ``serve`` in ``_serve_cli``, ``worker`` and
``run-worker`` in ``_worker_cli``, the operator's commands in ``_ops_cli``; what the first three
share in ``_cli_common``.
"""

from __future__ import annotations

import os

import click

from . import __version__
from ._cli_common import (
    ByteSize as ByteSize,
    worker_plan as _worker_plan,  # noqa: F401 - the name tests/bento_clients.py imports
)
from ._ops_cli import register
from ._serve_cli import serve
from ._worker_cli import run_worker, worker


@click.group()
@click.version_option(__version__, prog_name="taskserve")
def cli() -> None:
    """Serve model inference as durable async tasks."""


cli.add_command(serve)
cli.add_command(worker)
cli.add_command(run_worker)
register(cli)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli()
