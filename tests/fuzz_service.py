"""A small, quick service with every kind of input (image, file, array, pydantic, lists): what
tests/test_hardening.py probes by hand and tests/test_fuzz.py fuzzes from its OpenAPI document.

Every task ends in milliseconds whatever its arguments, so that a direct call (``POST /{r}``)
made by the fuzzer waits for little, and none raises on a value its signature admits.
"""

from __future__ import annotations

import hashlib
import math
import pathlib

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

import taskserve


class Point(BaseModel):
    x: float
    y: float


class Query(BaseModel):
    text: str = Field(max_length=200)
    top_k: int = Field(default=3, ge=1, le=50)
    tags: list[str] = Field(default_factory=list, max_length=10)


@taskserve.service(name="fuzzsvc")
class FuzzService:
    @taskserve.task
    def caption(self, img: Image.Image, words: int = 3) -> str:
        return f"{img.width}x{img.height} {img.mode}"[: max(words, 0) * 10 + 10]

    @taskserve.task
    def thumbnail(self, img: Image.Image) -> Image.Image:
        return img.convert("RGB").resize((8, 8))

    @taskserve.task
    def checksum(self, upload: pathlib.Path) -> dict[str, object]:
        data = upload.read_bytes()
        return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    @taskserve.task
    def keep(self, upload: pathlib.Path) -> pathlib.Path:
        """The uploaded file back, under the name its sender gave it (``report.html``, say)."""
        return upload

    @taskserve.task
    def stats(self, values: np.ndarray) -> dict[str, float]:
        """The mean of no values is NaN: a result JSON cannot carry as such."""
        flat = np.asarray(values, dtype=np.float64).ravel()
        return {"mean": float(flat.mean()) if flat.size else math.nan, "count": float(flat.size)}

    @taskserve.task
    def midpoint(self, a: Point, b: Point) -> Point:
        return Point(x=(a.x + b.x) / 2, y=(a.y + b.y) / 2)

    @taskserve.task
    def ratio(self, a: float, b: float) -> float:
        return a / b if b else math.inf

    @taskserve.task
    def search(self, query: Query) -> list[str]:
        return [query.text[:20]] * min(query.top_k, 3)

    @taskserve.api
    def describe(self, text: str, repeat: int = 1) -> dict[str, object]:
        return {"text": text[:50], "length": len(text), "repeat": max(0, min(repeat, 3))}
