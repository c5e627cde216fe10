"""Large binary arguments kept out of validation and spliced into the stored JSON as base64.

Stored arguments hold files as base64 inside JSON (the format every worker reads). Built the
plain way, a 100 MB upload would pass through pydantic, a JSON dump and base64 as several whole
copies at once, and the API process would need five or six times the upload in memory. Instead
a large value is validated on its own (checked here in chunks), stands in the arguments as a
random token while pydantic validates and dumps the rest, and its base64 text is then written
in chunks straight into the one buffer that becomes the stored bytes: about 1.4 times the
upload, whatever its size. Small values never come here.
"""

from __future__ import annotations

import binascii
import io
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

SPLICE_AT = 1024 * 1024  # binary values over this (bytes, or base64 characters) are spliced
RAW_CHUNK = 3 * 1024 * 1024  # a multiple of 3: the base64 of such chunks joins into the whole's
TEXT_CHUNK = 4 * 1024 * 1024  # a multiple of 4: base64 text checked a piece at a time


@dataclass
class Deferred:
    """One large value: its token in the dumped JSON, its base64 length and how to write that base64."""

    length: int
    write: Callable[[Callable[[bytes], object]], None]
    token: str = field(default_factory=lambda: "taskserve-splice-" + secrets.token_hex(16))


def from_file(file: IO[bytes], size: int) -> Deferred:
    """A value held in a (temporary) file of ``size`` bytes: encoded in chunks when written."""

    def write(out: Callable[[bytes], object]) -> None:
        file.seek(0)
        while chunk := file.read(RAW_CHUNK):
            out(binascii.b2a_base64(chunk, newline=False))

    return Deferred(4 * -(-size // 3), write)


def from_bytes(data: bytes) -> Deferred:
    def write(out: Callable[[bytes], object]) -> None:
        view = memoryview(data)
        for start in range(0, len(data), RAW_CHUNK):
            out(binascii.b2a_base64(view[start : start + RAW_CHUNK], newline=False))

    return Deferred(4 * -(-len(data) // 3), write)


def from_base64(text: str, decoded: IO[bytes] | None = None) -> Deferred:
    """A client's base64 text, checked in chunks as strictly as ``base64.b64decode(validate=True)``
    reads it in the worker, and stored as sent. ``decoded``: a file to write the bytes to as well
    (an image, checked from it). ``ValueError`` if it is not base64.
    """
    bad = ValueError("expected a file upload (multipart) or a base64-encoded string")
    if not text.isascii():
        raise bad
    last = len(text) - TEXT_CHUNK
    for start in range(0, len(text), TEXT_CHUNK):
        piece = text[start : start + TEXT_CHUNK].encode("ascii")
        # Each piece but the last a whole number of quads without padding: then the pieces
        # decode to what the whole text decodes to, and padding sits only at the end.
        if start < last and b"=" in piece:
            raise bad
        try:
            raw = binascii.a2b_base64(piece, strict_mode=True)
        except binascii.Error:
            raise bad from None
        if decoded is not None:
            decoded.write(raw)
    return Deferred(len(text), lambda out: _write_text(text, out))


def _write_text(text: str, out: Callable[[bytes], object]) -> None:
    for start in range(0, len(text), TEXT_CHUNK):
        out(text[start : start + TEXT_CHUNK].encode("ascii"))


def splice(dumped: bytes, values: list[Deferred]) -> bytes:
    """``dumped`` with each value's quoted token replaced by its base64, built in one buffer of the final size."""
    spans = sorted((dumped.index(f'"{v.token}"'.encode()) + 1, v) for v in values)
    total = len(dumped) + sum(v.length - len(v.token) for _, v in spans)
    buffer = io.BytesIO()
    buffer.seek(total - 1)
    buffer.write(b"\0")  # sized once: the writes below fill it, and getvalue() hands it over uncopied
    buffer.seek(0)
    view = memoryview(dumped)
    at = 0
    for start, value in spans:
        buffer.write(view[at:start])
        value.write(buffer.write)
        at = start + len(value.token)
    buffer.write(view[at:])
    return buffer.getvalue()
