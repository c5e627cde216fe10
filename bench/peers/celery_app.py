"""The Celery peer: the same three tasks, with Redis as broker and result backend.

Workers: `celery -A bench.peers.celery_app worker --pool=solo` (or `--pool=prefork`).
`BENCH_CELERY_REDIS` picks the Redis database; `BENCH_CELERY_TRACK_STARTED=1` turns on the
`STARTED` state, which the concurrency scenario needs to see tasks running.
"""

from __future__ import annotations

import base64
import io
import os
import time

from celery import Celery

from bench.services import execlog
from bench.services.render import render

REDIS_URL = os.environ.get("BENCH_CELERY_REDIS", "redis://127.0.0.1:6379/14")

app = Celery("bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_track_started=os.environ.get("BENCH_CELERY_TRACK_STARTED") == "1",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop(x: int) -> int:
    execlog.record("noop", x)
    return x


@app.task(name="sleep")
def sleep(ms: int) -> int:
    # Celery tasks are synchronous; a blocking sleep is its equivalent of `await asyncio.sleep`.
    began = execlog.now()
    time.sleep(ms / 1000)
    execlog.record("sleep", began, execlog.now())
    return ms


@app.task(name="image")
def image(prompt: str) -> str:
    # Celery's JSON serializer cannot carry bytes, so the PNG travels base64-encoded.
    execlog.record("image", prompt.rsplit(" ", 1)[-1])
    buffer = io.BytesIO()
    render(prompt).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
