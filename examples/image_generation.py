"""The demo service: images from a prompt, with a procedural Pillow image standing in for a diffusion model.

Run it with ``taskserve serve examples.image_generation:ImageGenerationService``.
"""

from __future__ import annotations

import hashlib
import math
import time

from PIL import Image, ImageDraw

import taskserve


class FakeDiffusionModel:
    """Draws a mountain range whose shape and colours follow from the prompt, in ~1.5 s."""

    def __init__(self, size: int = 512, steps: int = 15, step_seconds: float = 0.1) -> None:
        self.size = size
        self.steps = steps
        self.step_seconds = step_seconds

    def __call__(self, prompt: str) -> Image.Image:
        seed = hashlib.sha256(prompt.encode()).digest()
        sky = (seed[0] // 2 + 64, seed[1] // 2 + 96, 200 + seed[2] % 56)
        img = Image.new("RGB", (self.size, self.size), sky)
        draw = ImageDraw.Draw(img)
        for step in range(self.steps):  # a denoising loop's worth of work
            time.sleep(self.step_seconds)
            layer = step % 5
            shade = tuple(max(0, c - 30 * layer) for c in (seed[3 + layer], seed[8 + layer], seed[13 + layer]))
            base = self.size * (0.45 + 0.1 * layer)
            points = [(0, self.size)]
            for x in range(0, self.size + 16, 16):
                y = base - 60 * math.sin(x / (40 + seed[20 + layer] % 60) + layer) - (seed[x // 16 % 32] % 40)
                points.append((x, y))
            points.append((self.size, self.size))
            draw.polygon(points, fill=shade)
        return img


@taskserve.service(name="imagegen", workers=2)
class ImageGenerationService:
    def __init__(self) -> None:
        # Runs once in every worker process, never in the API process: load the model here.
        self.model = FakeDiffusionModel()

    @taskserve.task(timeout=600)
    def long_running_image_generation(self, prompt: str) -> Image.Image:
        return self.model(prompt)

    @taskserve.api
    def describe(self, text: str) -> dict[str, object]:
        return {"text": text, "words": len(text.split()), "sha256": hashlib.sha256(text.encode()).hexdigest()}
