"""Arrays, images and file names as they cross the wire, shared by the server, the worker and the clients.

Everything here reads bytes that a stranger sent: an array's size is known and checked
before memory is taken for it, an image's size is read from its header before it is
decoded, only formats without an interpreter behind them are opened (never EPS or PDF,
which Pillow hands to Ghostscript), and a file name never becomes a path as sent.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import sys
import unicodedata
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL.Image import Image

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
DEFAULT_MAX_ARRAY_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_ARRAY_ELEMENTS = 2**27
DEFAULT_MAX_JSON_DEPTH = 64
# The worker reads stored arguments with pydantic's JSON parser, which stops at 200 levels;
# what is stored wraps the client's values in a level or two of its own.
HIGHEST_JSON_DEPTH = 150

SAFE_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
ARRAY_DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
)
_DTYPE_TEXT = re.compile(r"[<>=|]?[a-z]{1,7}[0-9]{0,2}")  # "float32", "<f4", "u1"; never "(6000,6000)f8"
_KIND_RANK = {"b": 0, "u": 1, "i": 1, "f": 2}
MAX_FILENAME_BYTES = 255
MAX_ARRAY_DIMS = 32  # the typed form's shape holds at most this many sizes, so every form does


class InputTooLarge(ValueError):
    """A value over one of the limits; the server answers 413 rather than 422."""


@dataclass(frozen=True)
class InputLimits:
    """What one request may ask of the API process and the workers; every limit has a ``taskserve serve`` flag.

    Args:
        max_image_pixels: width x height of an image argument (``--max-image-pixels``).
        max_array_bytes: bytes of one array argument once decoded (``--max-array-bytes``).
        max_array_elements: elements of one array argument (``--max-array-elements``).
        max_json_depth: nesting of the arguments, the outer object counting as one level.
    """

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES
    max_array_elements: int = DEFAULT_MAX_ARRAY_ELEMENTS
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_array_bytes", "max_array_elements"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}.")
        if not 1 <= self.max_json_depth <= HIGHEST_JSON_DEPTH:
            raise ValueError(f"max_json_depth must be between 1 and {HIGHEST_JSON_DEPTH}, not {self.max_json_depth}.")


# -- arrays --------------------------------------------------------------------------------


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def checked_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The native-order form of an allowed dtype; ``ValueError`` for object, string, structured or sub-array ones."""
    if dtype.fields is not None or dtype.subdtype is not None or dtype.name not in ARRAY_DTYPES:
        raise ValueError(f"arrays must have a dtype of {', '.join(ARRAY_DTYPES)}; not {dtype.name!r}")
    return dtype.newbyteorder("=") if dtype.byteorder not in "=|" else dtype


def parse_dtype(value: Any) -> np.dtype[Any]:
    import numpy as np

    bad = ValueError(f"dtype must be one of {', '.join(ARRAY_DTYPES)}; got {_short(value)}")
    if not isinstance(value, str) or not _DTYPE_TEXT.fullmatch(value):
        raise bad
    try:
        dtype = np.dtype(value)
    except TypeError:
        raise bad from None
    return checked_dtype(dtype)


def _check_size(count: int, itemsize: int, limits: InputLimits | None) -> None:
    if limits is None:
        return
    if count > limits.max_array_elements:
        raise InputTooLarge(
            f"the array has {count} elements, over the limit of {limits.max_array_elements} (--max-array-elements)"
        )
    if count * itemsize > limits.max_array_bytes:
        raise InputTooLarge(
            f"the array takes {count * itemsize} bytes, over the limit of {limits.max_array_bytes} (--max-array-bytes)"
        )


def _cast(arr: np.ndarray, dtype: np.dtype[Any] | None) -> np.ndarray:
    """Cast to a wanted dtype only where no value can change kind: bool to int to float, integers in range."""
    import numpy as np

    if dtype is None or arr.dtype == dtype:
        return arr
    if _KIND_RANK[arr.dtype.kind] > _KIND_RANK[dtype.kind]:
        raise ValueError(f"expected {dtype.name} values, got {arr.dtype.name} ones")
    if dtype.kind in "iu" and arr.dtype.kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise ValueError(f"values out of the range of {dtype.name} ({info.min} to {info.max})")
    with np.errstate(over="ignore"):
        cast = arr.astype(dtype)
    if dtype.kind == "f":  # a value too large for a narrower float would become infinity
        if np.isinf(cast).sum() != (np.isinf(arr).sum() if arr.dtype.kind == "f" else 0):
            raise ValueError(f"values out of the range of {dtype.name} (up to {np.finfo(dtype).max:g})")
    return cast


def _from_list(data: Any, limits: InputLimits | None) -> np.ndarray:
    import numpy as np

    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise ValueError("expected a rectangular nested list of numbers") from None
    if arr.dtype.kind not in _KIND_RANK:
        raise ValueError("expected a rectangular nested list of numbers (or booleans)")
    _check_size(arr.size, arr.dtype.itemsize, limits)
    return arr


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_ARRAY_DIMS:
        raise ValueError(f"shape must be a list of at most {MAX_ARRAY_DIMS} sizes; got {_short(value)}")
    if not all(type(n) is int and n >= 0 for n in value):
        raise ValueError(f"shape must hold whole numbers of 0 or more; got {_short(value)}")
    return tuple(value)


def _from_typed(value: dict[str, Any], limits: InputLimits | None) -> np.ndarray:

    unknown = set(value) - {"dtype", "shape", "data"}
    if unknown or "dtype" not in value:
        raise ValueError('expected {"dtype", "shape", "data"}, with data a nested list or base64 of the raw bytes')
    dtype = parse_dtype(value["dtype"])
    shape = _shape(value["shape"]) if "shape" in value else None
    data = value["data"]
    if not isinstance(data, str):
        arr = _cast(_from_list(data, limits), dtype)
        if shape is not None and arr.shape != shape:
            raise ValueError(f"the data has shape {list(arr.shape)}, not the {list(shape)} given")
        return arr
    if shape is None:
        raise ValueError("base64 data needs a shape")
    count = math.prod(shape)
    _check_size(count, dtype.itemsize, limits)
    if len(data) != 4 * math.ceil(count * dtype.itemsize / 3):  # padded base64 of exactly the bytes needed
        raise ValueError(f"the data is not base64 of {count * dtype.itemsize} bytes ({count} x {dtype.name})")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the data is not valid base64") from None
    return _from_bytes(raw, dtype.newbyteorder("<"), shape, fortran=False)


def _from_bytes(raw: bytes, dtype: np.dtype[Any], shape: tuple[int, ...], *, fortran: bool) -> np.ndarray:
    import numpy as np

    count = math.prod(shape)
    if len(raw) != count * dtype.itemsize:
        raise ValueError(f"expected {count * dtype.itemsize} bytes of data, got {len(raw)}")
    if dtype.kind == "b":  # any nonzero byte is True, as numpy itself reads them
        flat = np.frombuffer(raw, np.uint8, count) != 0
    else:
        flat = np.frombuffer(raw, dtype, count).astype(checked_dtype(dtype))  # a writable native-order copy
    arr: np.ndarray = flat.reshape(shape, order="F" if fortran else "C")
    return arr


def _from_npy(data: bytes, limits: InputLimits | None) -> np.ndarray:
    """A ``.npy`` file, read from its header first: no pickle, and no memory taken before the size is checked."""
    import numpy as np

    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(buf)
    except (ValueError, TypeError, SyntaxError, OSError, EOFError):
        raise ValueError("expected a .npy file (numpy.save), a typed array object or a nested list") from None
    checked_dtype(dtype)
    _check_size(math.prod(shape), dtype.itemsize, limits)
    return _from_bytes(data[buf.tell() :], dtype, tuple(shape), fortran=bool(fortran))


def array_from_wire(value: Any, dtype: np.dtype[Any] | None = None, limits: InputLimits | None = None) -> np.ndarray:
    """An array from any of its wire forms; ``ValueError`` says what is wrong, ``InputTooLarge`` names the limit.

    ``dtype`` is the parameter's own (``NDArray[np.float32]``); ``limits`` is None for trusted,
    already validated data (the worker reading its queue, a client reading its server).
    """
    import numpy as np

    if isinstance(value, (bytes, bytearray)):
        arr = _from_npy(bytes(value), limits)
    elif isinstance(value, dict):
        arr = _from_typed(value, limits)
    elif isinstance(value, np.ndarray):
        arr = value
        checked_dtype(arr.dtype)
        _check_size(arr.size, arr.dtype.itemsize, limits)
    else:
        arr = _from_list(value, limits)
    if arr.ndim > MAX_ARRAY_DIMS:
        # A nested list or .npy file may have more (numpy 2 allows 64), but the array is stored
        # in the typed form, which the worker would then refuse: the task would fail unrun.
        raise ValueError(f"an array has at most {MAX_ARRAY_DIMS} dimensions; got {arr.ndim}")
    return _cast(arr, dtype)


def array_to_wire(arr: Any) -> dict[str, Any]:
    """The typed JSON form: exact (NaN included), little-endian, a third larger than the raw bytes."""
    import numpy as np

    arr = np.asarray(arr)
    try:
        dtype = checked_dtype(arr.dtype)
    except ValueError as exc:
        raise TypeError(f"Cannot send a numpy array of dtype {arr.dtype}: {exc}.") from None
    raw = np.ascontiguousarray(arr, dtype=dtype.newbyteorder("<")).tobytes()
    return {"dtype": dtype.name, "shape": list(arr.shape), "data": base64.b64encode(raw).decode("ascii")}


def array_to_npy(arr: Any) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def annotated_dtype(annotation: Any) -> np.dtype[Any] | None:
    """The dtype of ``NDArray[np.float32]`` (``ndarray[Any, np.dtype[np.float32]]``); None when not pinned."""
    import typing

    import numpy as np

    args = typing.get_args(annotation)
    if len(args) != 2 or typing.get_origin(args[1]) is not np.dtype:
        return None
    (scalar,) = typing.get_args(args[1]) or (None,)
    abstract = (np.generic, np.number, np.integer, np.signedinteger, np.unsignedinteger, np.inexact, np.floating)
    if not (isinstance(scalar, type) and issubclass(scalar, np.generic)) or scalar in abstract:
        return None  # np.floating[Any] and the like leave the dtype to the data
    return checked_dtype(np.dtype(scalar))


def is_ndarray(value: Any) -> bool:
    np = sys.modules.get("numpy")  # no array can exist before numpy is imported
    return np is not None and isinstance(value, np.ndarray)


# -- images --------------------------------------------------------------------------------


def open_image(data: bytes | IO[bytes], max_pixels: int | None = None) -> Image:
    """An image opened from its header only, in a safe format and under the pixel limit; ``load()`` decodes it.

    Raises ``InputTooLarge`` over ``max_pixels`` and ``ValueError`` for anything that is not an
    image of the safe formats. With no ``max_pixels`` Pillow's own decompression-bomb check holds.
    """
    from PIL import Image, UnidentifiedImageError

    if max_pixels is not None and Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # ours is the limit that holds; Pillow's would refuse first
    formats = ", ".join(SAFE_IMAGE_FORMATS)
    try:
        source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data  # a file is read in place
        img = Image.open(source, formats=SAFE_IMAGE_FORMATS)
    except Image.DecompressionBombError:
        limit = max_pixels or Image.MAX_IMAGE_PIXELS
        raise InputTooLarge(f"the image has more pixels than the limit of {limit} (--max-image-pixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise ValueError(f"expected an image file in one of the formats {formats}") from None
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise InputTooLarge(
            f"the image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(--max-image-pixels)"
        )
    return img


def verify_image(data: bytes | IO[bytes], max_pixels: int | None) -> None:
    """Check an image without decoding its pixels (PNG checksums and structure)."""
    img = open_image(data, max_pixels)
    try:
        img.verify()
    except Exception:  # Pillow's plugins raise many kinds for broken files
        raise ValueError(f"expected an image file in one of the formats {', '.join(SAFE_IMAGE_FORMATS)}") from None
    finally:
        img.close()


def load_image(data: bytes, max_pixels: int | None = None) -> Image:
    img = open_image(data, max_pixels)
    img.load()
    return img


# -- file names ----------------------------------------------------------------------------


def safe_filename(name: Any) -> str | None:
    """An uploaded file's name reduced to one harmless path component, or None if nothing is left.

    Directories (``/`` and ``\\``), control characters and NUL go; ``.`` and ``..`` are no name;
    the result is cut to 255 bytes of UTF-8, keeping the extension.
    """
    if not isinstance(name, str):
        return None
    text = name.replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cs")).strip()
    if text in ("", ".", ".."):
        return None
    if len(text.encode("utf-8")) > MAX_FILENAME_BYTES:
        stem, dot, ext = text.rpartition(".")
        ext = dot + ext if stem and len(ext.encode()) <= 16 else ""
        keep = MAX_FILENAME_BYTES - len(ext.encode())
        text = (text[: -len(ext)] if ext else text).encode()[:keep].decode("utf-8", "ignore") + ext
    return text
