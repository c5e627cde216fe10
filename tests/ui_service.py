"""A small image-and-text service for the dashboard's browser tests and screenshots.

Module level, so worker processes can import it. Its routes look like a real team's (image
generation with previews, transcription, embeddings, moderation) so the screenshots the test
run saves show the dashboard as it is used, not a list of test helpers.
"""

from __future__ import annotations

import asyncio
import hashlib

from PIL import Image, ImageDraw

import taskserve


def _picture(prompt: str, size: int, done: float) -> Image.Image:
    """A landscape-ish picture from the prompt's hash, sharper as ``done`` goes to 1."""
    seed = hashlib.sha256(prompt.encode()).digest()
    sky, ground = (seed[0] // 3 + 60, seed[1] // 3 + 110, 200), (40, seed[2] // 2 + 90, 70)
    img = Image.new("RGB", (size, size), sky)
    draw = ImageDraw.Draw(img)
    draw.polygon([(0, size), (size * 0.35, size * 0.45), (size * 0.7, size)], fill=(90, 100, 120))
    draw.polygon([(size * 0.3, size), (size * 0.7, size * 0.35), (size, size)], fill=(120, 130, 150))
    draw.rectangle((0, int(size * 0.8), size, size), fill=ground)
    draw.ellipse((size * 0.72, size * 0.1, size * 0.88, size * 0.26), fill=(255, 230, 120))
    if done < 1:  # an unfinished preview: coarse blocks
        block = max(2, int(size * (1 - done) / 6))
        img = img.resize((size // block, size // block)).resize((size, size), Image.Resampling.NEAREST)
    return img


def _check(text: str) -> None:
    if "crash" in text:
        raise ValueError(f"the moderation model cannot score {text!r}: input contains a blocked token")


@taskserve.service(name="studio")
class Studio:
    @taskserve.task(max_attempts=1)
    async def generate_image(self, prompt: str, steps: int = 12, pause: float = 0.05, size: int = 256) -> Image.Image:
        for i in range(steps):
            taskserve.progress(
                (i + 1) / steps, f"denoising step {i + 1}/{steps}", preview=_picture(prompt, size, i / steps)
            )
            await asyncio.sleep(pause)
        return _picture(prompt, size, 1.0)

    @taskserve.task
    async def transcribe(self, audio_url: str, seconds: float = 0.2) -> dict[str, object]:
        steps = max(1, int(seconds / 0.1))
        for i in range(steps):
            taskserve.progress((i + 1) / steps, f"chunk {i + 1}/{steps}")
            await asyncio.sleep(seconds / steps)
        return {"audio_url": audio_url, "language": "en", "text": "Thanks for calling, how can I help?"}

    @taskserve.task
    def embed(self, texts: list[str]) -> list[list[float]]:
        return [[round(b / 255, 3) for b in hashlib.sha256(t.encode()).digest()[:4]] for t in texts]

    @taskserve.task(max_attempts=1)
    def moderate(self, text: str) -> dict[str, float]:
        _check(text)
        return {"toxicity": 0.02, "spam": 0.01}
