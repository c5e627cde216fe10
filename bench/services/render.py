"""The procedural image every system renders for the `image` task."""

from __future__ import annotations

import hashlib

from PIL import Image, ImageDraw

SIZE = 256


def render(prompt: str) -> Image.Image:
    """Draw a 256x256 picture determined by `prompt`: a two-colour gradient and a few shapes."""
    seed = hashlib.sha256(prompt.encode()).digest()
    top, bottom = seed[0:3], seed[3:6]
    gradient = Image.linear_gradient("L").resize((SIZE, SIZE))
    image = Image.composite(
        Image.new("RGB", (SIZE, SIZE), tuple(bottom)), Image.new("RGB", (SIZE, SIZE), tuple(top)), gradient
    )
    draw = ImageDraw.Draw(image)
    for i in range(8):
        x, y, r = seed[6 + 3 * i], seed[7 + 3 * i], 8 + seed[8 + 3 * i] % 48
        colour = (seed[(i * 5) % 32], seed[(i * 7 + 1) % 32], seed[(i * 11 + 2) % 32])
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    return image
