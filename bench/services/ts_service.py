"""The taskserve side of the benchmark: the same three tasks every peer implements."""

from __future__ import annotations

import asyncio

from PIL.Image import Image

import taskserve
from bench.services import execlog
from bench.services.render import render


@taskserve.service(name="bench")
class Bench:
    @taskserve.task
    def noop(self, x: int) -> int:
        execlog.record("noop", x)
        return x

    @taskserve.task
    async def sleep(self, ms: int) -> int:
        began = execlog.now()
        await asyncio.sleep(ms / 1000)
        execlog.record("sleep", began, execlog.now())
        return ms

    @taskserve.task
    def image(self, prompt: str) -> Image:
        execlog.record("image", prompt.rsplit(" ", 1)[-1])
        return render(prompt)
