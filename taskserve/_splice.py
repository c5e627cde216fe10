"""Large binary arguments kept out of validation and spliced into the stored JSON as base64.

Stored arguments hold files as base64 inside JSON (the format every worker reads). Built the
plain way, a 100 MB upload would pass through pydantic, a JSON dump and base64 as several whole
copies at once, and the API process would need five or six times the upload in memory. Instead
a large value is validated on its own (checked here in chunks), stands in the arguments as a
random token while pydantic validates and dumps the rest, and its base64 text is then written
in chunks straight into an unnamed temporary file that becomes the stored arguments
(``SpooledArgs``), which the queue writes to its store in pieces as well: the API process holds
a few chunks of the upload at a time, whatever its size. Small values never come here.
"""

from __future__ import annotations

import binascii
import hashlib
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

SPLICE_AT = 1024 * 1024  # binary values over this (bytes, or base64 characters) are spliced
RAW_CHUNK = 3 * 1024 * 1024  # a multiple of 3: the base64 of such chunks joins into the whole's
TEXT_CHUNK = 4 * 1024 * 1024  # a multiple of 4: base64 text checked a piece at a time
STORE_CHUNK = 4 * 1024 * 1024  # what a queue writes to its store at a time


class SpooledArgs:
    """Stored arguments too large to hold in memory: their bytes in an unnamed temporary file.

    A queue writes them to its store a chunk at a time (SQLite into a blob it sized first, Redis
    by appends to a staging key) instead of building the whole value in memory, where SQLite
    alone would need two more copies of it. The digest is taken as the file is written, for
    idempotency keys. Whoever enqueues them closes them; the file has no name on disk, so a
    crash leaves nothing behind.
    """

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()
        self.size = 0
        self._hash = hashlib.sha256()

    @classmethod
    def of(cls, data: bytes) -> SpooledArgs:
        """``data`` in a file: a value read back whole (a retry's) is stored in chunks as it first was."""
        out = cls()
        view = memoryview(data)
        for start in range(0, len(data), STORE_CHUNK):
            out.write(view[start : start + STORE_CHUNK])
        return out

    def write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self._hash.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def chunks(self, size: int = STORE_CHUNK) -> Iterator[bytes]:
        self.file.seek(0)
        while chunk := self.file.read(size):
            yield chunk

    def read(self) -> bytes:
        """The whole value: only for a caller that needs it in memory anyway."""
        return b"".join(self.chunks())

    def __len__(self) -> int:
        return self.size

    def close(self) -> None:
        self.file.close()


def close_all(values: Iterable[object]) -> None:
    """Close the ``SpooledArgs`` among ``values``: arguments a request validated but will not enqueue."""
    for value in values:
        if isinstance(value, SpooledArgs):
            value.close()


@dataclass
class Deferred:
    """One large value: its token in the dumped JSON and how to write its base64."""

    write: Callable[[Callable[[bytes], object]], None]
    token: str = field(default_factory=lambda: "taskserve-splice-" + secrets.token_hex(16))


def from_file(file: IO[bytes]) -> Deferred:
    """A value held in a (temporary) file: encoded in chunks when written."""

    def write(out: Callable[[bytes], object]) -> None:
        file.seek(0)
        while chunk := file.read(RAW_CHUNK):
            out(binascii.b2a_base64(chunk, newline=False))

    return Deferred(write)


def from_bytes(data: bytes) -> Deferred:
    def write(out: Callable[[bytes], object]) -> None:
        view = memoryview(data)
        for start in range(0, len(data), RAW_CHUNK):
            out(binascii.b2a_base64(view[start : start + RAW_CHUNK], newline=False))

    return Deferred(write)


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
    return Deferred(lambda out: _write_text(text, out))


def _write_text(text: str, out: Callable[[bytes], object]) -> None:
    for start in range(0, len(text), TEXT_CHUNK):
        out(text[start : start + TEXT_CHUNK].encode("ascii"))


def splice(dumped: bytes, values: list[Deferred]) -> SpooledArgs:
    """``dumped`` with each value's quoted token replaced by its base64, written to a temporary file."""
    spans = sorted((dumped.index(f'"{v.token}"'.encode()) + 1, v) for v in values)
    out = SpooledArgs()
    try:
        view = memoryview(dumped)
        at = 0
        for start, value in spans:
            out.write(view[at:start])
            value.write(out.write)
            at = start + len(value.token)
        out.write(view[at:])
    except BaseException:
        out.close()
        raise
    return out
