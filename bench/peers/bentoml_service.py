"""The BentoML peer: the same three tasks as `bench.services.ts_service`, as `@bentoml.task`s.

Run: `bentoml serve bench.peers.bentoml_service:Bench`. Tasks run inside the two service workers
and their state lives in BentoML's own SQLite result store.
"""

from __future__ import annotations

import asyncio
import os

import bentoml
from PIL.Image import Image

from bench.services import execlog
from bench.services.render import render


@bentoml.service(name="bench", workers=int(os.environ.get("BENCH_BENTOML_WORKERS", "2")))
class Bench:
    @bentoml.task
    def noop(self, x: int) -> int:
        execlog.record("noop", x)
        return x

    @bentoml.task
    async def sleep(self, ms: int) -> int:
        began = execlog.now()
        await asyncio.sleep(ms / 1000)
        execlog.record("sleep", began, execlog.now())
        return ms

    @bentoml.task
    def image(self, prompt: str) -> Image:
        execlog.record("image", prompt.rsplit(" ", 1)[-1])
        return render(prompt)
