"""A BentoML 1.4 service file, written as a BentoML user would: nothing in it knows of taskserve.

tests/test_bentoml.py serves it with ``taskserve serve tests.bento_service:Studio`` from a venv
holding bentoml (scripts/bentoml_env), and drives it with BentoML's own clients.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.validators import ContentType, DType
from PIL import Image as PILImage
from PIL.Image import Image
from pydantic import BaseModel, Field


class Prompt(BaseModel):
    text: str
    steps: int = 2


class Measures(BaseModel):
    length: float
    width: float = 1.0


class Caption(BaseModel):
    text: str
    words: int


@bentoml.service(name="studio", workers=2, traffic={"timeout": 20}, resources={"cpu": "1"})
class Studio:
    def __init__(self) -> None:
        self.started = time.time()
        self.calls = 0

    @bentoml.on_startup
    def warm_up(self) -> None:
        self.warmed = True

    @bentoml.api
    def shout(self, text: str, times: int = 1) -> str:
        return (text.upper() + "!") * times

    @bentoml.api(route="/describe")
    def caption(self, prompt: Prompt, ctx: bentoml.Context) -> Caption:
        ctx.state["captions"] = ctx.state.get("captions", 0) + 1
        return Caption(text=f"{prompt.text} x{prompt.steps} at {ctx.request.url.path}", words=len(prompt.text.split()))

    @bentoml.task
    def render(self, prompt: str, size: int = Field(8, description="Pixels a side.")) -> Image:
        """Draws a square whose colour depends on the prompt."""
        shade = sum(prompt.encode()) % 256
        return PILImage.new("RGB", (size, size), (shade, 255 - shade, 0))

    @bentoml.task
    def invert(self, image: Image, note: str = "") -> Image:
        inverted = PILImage.eval(image.convert("RGB"), lambda v: 255 - v)
        return inverted

    @bentoml.task
    def count_bytes(self, document: Annotated[Path, ContentType("text/plain")], label: str) -> dict[str, int | str]:
        return {"label": label, "bytes": document.stat().st_size, "name": document.name}

    @bentoml.task
    def scale(self, values: np.ndarray, factor: float = 2.0) -> np.ndarray:
        return values * factor

    @bentoml.task
    def story(self, prompt: Prompt) -> str:
        self.calls += 1
        return " ".join([prompt.text] * prompt.steps)

    @bentoml.task
    def explode(self, reason: str) -> str:
        raise RuntimeError(f"refused: {reason}")

    @bentoml.task
    async def nap(self, seconds: float, context: bentoml.Context) -> str:
        await asyncio.sleep(seconds)
        return "rested"

    @bentoml.api(input_spec=Measures)
    def area(self, **params: Any) -> float:
        return params["length"] * params["width"]

    @bentoml.api
    def dtype_of(self, values: Annotated[np.ndarray, DType("float32")]) -> str:
        return str(values.dtype)

    @bentoml.task(batchable=True, max_batch_size=8, max_latency_ms=200)
    def lengths(self, texts: list[str]) -> list[int]:
        return [len(t) for t in texts]

    @bentoml.api(batchable=True)  # BentoML's default max_latency_ms: 60 s
    def double(self, values: np.ndarray) -> np.ndarray:
        return values * 2

    @bentoml.api
    async def tokens(self, prompt: str, n: int = 3, pause: float = 0.0) -> AsyncGenerator[str, None]:
        for i in range(n):
            if i:
                await asyncio.sleep(pause)
            yield f"{prompt}{i} "

    @bentoml.api
    def total(self, values: list[float], /) -> float:  # BentoML's root input: the body is the list
        return sum(values)

    @bentoml.api
    def reverse_file(self, document: Path, ctx: bentoml.Context) -> Path:
        out = Path(ctx.temp_dir) / "reversed.txt"
        out.write_bytes(document.read_bytes()[::-1])
        return out


def _health(scope, receive, send):  # a bare ASGI app, mounted below
    raise NotImplementedError


@bentoml.asgi_app(_health, path="/extra")
@bentoml.service(
    resources={"gpu": 1, "memory": "2Gi"},
    envs=[{"name": "MODEL_ID", "value": "tiny"}],
    traffic={"timeout": 5, "max_concurrency": 4},
)
class Gateway:
    """Declared only, never served here: its options show what maps and what is warned about."""

    studio = bentoml.depends(Studio)

    @bentoml.on_shutdown
    def close(self) -> None:
        pass

    @bentoml.api(batchable=True, batch_dim=(0, 1))
    def embed(self, texts: list[str]) -> list[list[float]]:
        return [[float(len(t))] for t in texts]
