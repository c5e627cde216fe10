"""Turning HTTP input into validated, storable arguments, and results into bytes.

Arguments are validated in the API process against a pydantic model built from the
signature, then stored as JSON: the queue never holds a pickle, and nothing received over
HTTP is unpickled or evaluated. Files, images, bytes and arrays travel inside that JSON
(base64, arrays with their dtype and shape) and become real Python objects again only in the
worker. What is stored must load there: non-finite numbers, nesting past the limit and
values that cannot be written as JSON are refused at submit, never stored to fail later.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import inspect
import io
import math
import mimetypes
import os
import pathlib
import tempfile
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import pydantic
import pydantic_core
from pydantic import ConfigDict, Field, PlainSerializer, PlainValidator, ValidationInfo, WithJsonSchema
from pydantic_core import PydanticCustomError

from . import _splice
from ._wire import (
    ARRAY_DTYPES,
    SAFE_IMAGE_FORMATS,
    InputLimits,
    InputTooLarge,
    annotated_dtype,
    array_from_wire,
    array_to_wire,
    load_image,
    safe_filename,
    verify_image,
)
from .exceptions import ServiceDefinitionError, ValidationFailed

DEFAULT_LIMITS = InputLimits()

Kind = Literal["json", "image", "file", "bytes", "ndarray"]
BINARY_KINDS = frozenset({"image", "file", "bytes"})


@dataclass
class FileArg:
    """An uploaded file as stored in the queue: raw bytes plus what the client said of them."""

    data: bytes
    filename: str | None = None
    content_type: str | None = None


@dataclass
class SpooledFileArg(FileArg):
    """An uploaded file too large to read into memory: its bytes stay in ``file`` (``data`` is empty).

    The API's multipart reader makes these; ``Codec.validate`` splices them into the stored
    arguments from the file, and the reader closes the file afterwards.
    """

    file: typing.IO[bytes] | None = None
    size: int = 0


@dataclass
class _Placeholder(FileArg):
    """What pydantic sees of a large value, already checked: its token is dumped in place of its base64."""

    token: str = ""


def _optional_inner(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _is_subclass(annotation: Any, module: str, name: str) -> bool:
    if not isinstance(annotation, type):
        return False
    return any(c.__module__ == module and c.__name__ == name for c in annotation.__mro__)


def kind_of(annotation: Any) -> Kind:
    inner, _ = _optional_inner(annotation)
    if typing.get_origin(inner) is Annotated:
        inner = typing.get_args(inner)[0]
    if _is_subclass(inner, "PIL.Image", "Image"):
        return "image"
    if isinstance(inner, type) and issubclass(inner, os.PathLike):
        return "file"
    if inner is bytes:
        return "bytes"
    if _is_subclass(inner, "numpy", "ndarray") or _is_subclass(typing.get_origin(inner), "numpy", "ndarray"):
        return "ndarray"
    return "json"


# -- pydantic types for the binary kinds ---------------------------------------------------
#
# The API validates with ``context={"limits": ...}``; the worker reads what it stored without
# limits (the values passed them at submit), but with the same safe formats and dtypes.

Validator = Callable[[Any, ValidationInfo], Any]


def _limits(info: ValidationInfo) -> InputLimits | None:
    context = info.context
    return context.get("limits") if isinstance(context, dict) else None


def _guarded(fn: Validator) -> Validator:
    """Any fault reading a client's value is that value's fault (422, ``too_large`` for a limit), never a 500."""

    # Not functools.wraps: pydantic reads the signature, and must see the ``info`` parameter.
    def validator(value: Any, info: ValidationInfo) -> Any:
        try:
            return fn(value, info)
        except InputTooLarge as exc:
            raise PydanticCustomError("too_large", str(exc)) from None
        except (ValueError, PydanticCustomError):
            raise
        except (TypeError, ArithmeticError, LookupError, OSError, MemoryError) as exc:
            raise ValueError(f"cannot read the value ({type(exc).__name__})") from None

    return validator


def _to_file(value: Any, info: ValidationInfo | None = None) -> FileArg:
    if isinstance(value, _Placeholder):
        return value
    if isinstance(value, FileArg):
        return FileArg(value.data, safe_filename(value.filename), _content_type(value.content_type))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return FileArg(bytes(value))
    if isinstance(value, str):
        try:
            return FileArg(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise ValueError("expected a file upload (multipart) or a base64-encoded string") from None
    if isinstance(value, dict) and isinstance(value.get("data"), str):
        stored = _to_file(value["data"])
        return FileArg(stored.data, safe_filename(value.get("filename")), _content_type(value.get("content_type")))
    raise ValueError("expected a file upload (multipart) or a base64-encoded string")


def _content_type(value: Any) -> str | None:
    if isinstance(value, str) and len(value) <= 255 and value.isprintable() and value.isascii():
        return value
    return None


def _to_image_file(value: Any, info: ValidationInfo) -> FileArg:
    if isinstance(value, _Placeholder):
        return value  # checked as an image before it became one
    file = _to_file(value)
    limits = _limits(info)
    if limits is not None:  # the worker opens it again, with the safe formats only, in load()
        verify_image(file.data, limits.max_image_pixels)
    return file


def _dump_file(file: FileArg) -> dict[str, Any]:
    if isinstance(file, _Placeholder):
        return {"data": file.token, "filename": file.filename, "content_type": file.content_type}
    return {"data": base64.b64encode(file.data).decode(), "filename": file.filename, "content_type": file.content_type}


def _array_type(dtype: Any) -> Any:
    def to_array(value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, FileArg):  # a .npy part of a multipart request
            value = value.data
        return array_from_wire(value, dtype, _limits(info))

    typed = copy.deepcopy(ARRAY_SCHEMA)
    if dtype is not None:
        typed["description"] += f" The task gets {dtype.name}: other dtypes are cast where no value changes kind."
    schema = {
        "description": "An n-d array: a nested list of numbers, the typed object, or a .npy file part (multipart).",
        "anyOf": [
            {"type": "array", "items": {}},
            typed,
            {"type": "string", "format": "binary", "contentMediaType": "application/x-npy"},
        ],
    }
    return Annotated[
        Any,
        PlainValidator(_guarded(to_array)),
        PlainSerializer(array_to_wire, when_used="json"),
        WithJsonSchema(schema),
    ]


ARRAY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An array with its dtype and shape; data is a nested list or base64 of the raw little-endian bytes.",
    "required": ["dtype", "data"],
    "additionalProperties": False,
    "properties": {
        "dtype": {"type": "string", "enum": list(ARRAY_DTYPES)},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 32},
        "data": {"anyOf": [{"type": "array", "items": {}}, {"type": "string", "contentEncoding": "base64"}]},
    },
}
_BINARY_SCHEMA = {"type": "string", "format": "binary", "description": "A file upload (multipart) or base64 in JSON."}
FileType = Annotated[
    FileArg,
    PlainValidator(_guarded(_to_file)),
    PlainSerializer(_dump_file, when_used="json"),
    WithJsonSchema(_BINARY_SCHEMA),
]
ImageType = Annotated[
    FileArg,
    PlainValidator(_guarded(_to_image_file)),
    PlainSerializer(_dump_file, when_used="json"),
    WithJsonSchema(
        {
            **_BINARY_SCHEMA,
            "contentMediaType": "image/*",
            "description": f"An image ({', '.join(SAFE_IMAGE_FORMATS)}): a file upload (multipart) or base64 in JSON.",
        }
    ),
]
_FIELD_TYPES: dict[str, Any] = {"image": ImageType, "file": FileType, "bytes": FileType}


@dataclass
class Param:
    name: str
    annotation: Any
    kind: Kind
    optional: bool
    required: bool

    @property
    def is_text(self) -> bool:
        """Whether a multipart form field for it is taken as a raw string, not as JSON."""
        inner, _ = _optional_inner(self.annotation)
        return inner is str


class Codec:
    """The input model and output encoding of one endpoint, derived from its signature."""

    # A parameter whose value may be the whole JSON body rather than a field of it: BentoML's
    # "root input" (a method's one positional-only parameter); set by taskserve._bentoml.
    root: str | None = None

    def __init__(self, fn: Any, name: str) -> None:
        self.name = name
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
        except Exception as exc:
            raise ServiceDefinitionError(f"Cannot resolve the type annotations of {name!r}: {exc}.") from exc
        sig = inspect.signature(fn)
        self.params: list[Param] = []
        fields: dict[str, Any] = {}
        for i, (pname, p) in enumerate(sig.parameters.items()):
            if i == 0 and pname in ("self", "cls"):
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ServiceDefinitionError(f"{name!r} cannot take *args or **kwargs; name each parameter.")
            ann = hints.get(pname, Any)
            kind = kind_of(ann)
            inner, optional = _optional_inner(ann)
            field_type: Any = ann
            if kind != "json":
                field_type = _FIELD_TYPES[kind] if kind != "ndarray" else _array_type(_pinned_dtype(name, pname, inner))
                if optional:
                    field_type = field_type | None
            default = ... if p.default is inspect.Parameter.empty else p.default
            required = default is ...
            if kind != "json" and not required and default is not None:
                raise ServiceDefinitionError(
                    f"Parameter {pname!r} of {name!r}: a file parameter can only default to None."
                )
            self.params.append(Param(pname, ann, kind, optional, required))
            # Fields get a prefix and the real name as alias, so a parameter may be called
            # ``json`` or ``schema`` without clashing with pydantic's own attributes.
            fields[f"p_{pname}"] = (field_type, Field(default, alias=pname))
        try:
            self.model: type[pydantic.BaseModel] = pydantic.create_model(
                f"{_camel(name)}Input", __config__=ConfigDict(extra="forbid"), **fields
            )
            self.model.model_json_schema()
        except (pydantic.PydanticSchemaGenerationError, TypeError, pydantic.errors.PydanticUserError) as exc:
            raise ServiceDefinitionError(f"taskserve cannot serve the parameters of {name!r}: {exc}") from exc
        ret = hints.get("return", Any)
        # A generator task streams: each yielded item is an output event, the result is their list.
        self.streams = inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)
        if self.streams:
            item = _yielded(ret)
            if kind_of(item) != "json":
                raise ServiceDefinitionError(
                    f"Generator {name!r} must yield JSON values (str, numbers, dicts, lists, pydantic models); "
                    f"it yields {item!r}."
                )
            ret = list[item]  # type: ignore[valid-type]
        self.output_kind: Kind = kind_of(ret)
        self.output_schema: dict[str, Any] = {}
        if self.output_kind == "json" and ret is not Any:
            try:
                self.output_schema = pydantic.TypeAdapter(ret).json_schema()
            except Exception:
                self.output_schema = {}
        self.by_name = {p.name: p for p in self.params}

    @property
    def writes_files(self) -> bool:
        """Whether ``load`` writes uploads under its workdir (``Path`` parameters)."""
        return any(p.kind == "file" for p in self.params)

    @property
    def binary_inputs(self) -> bool:
        """Whether any parameter takes a file, image, bytes or array, whose validation may take a while."""
        return any(p.kind != "json" for p in self.params)

    # -- API side --------------------------------------------------------------------------

    def validate(self, data: Any, limits: InputLimits | None = None) -> bytes | _splice.SpooledArgs:
        """Validate client arguments; return JSON the worker can load. Raises ``ValidationFailed``.

        Arguments holding a file, image or bytes value over a MiB come back in a temporary file
        (``SpooledArgs``), which the queue stores in chunks.
        """
        limits = limits or DEFAULT_LIMITS
        if not isinstance(data, dict):
            raise ValidationFailed(
                f"The arguments of {self.name!r} must be a JSON object of parameter names to values.",
                [{"loc": [], "msg": "expected an object", "type": "object_type"}],
            )
        # Large files, images and bytes are checked on their own and spliced into what is stored
        # (taskserve/_splice.py); small arguments never leave the plain path below.
        deferred: list[_splice.Deferred] = []
        if self.opaque:
            data = self._defer(data, limits, deferred)
        mistyped = _mistyped(data, self.input_schema, self.input_schema.get("$defs", {}), [])
        if mistyped is not None:
            raise self._invalid([{"loc": mistyped[0], "msg": mistyped[1], "type": "type_error"}])
        try:
            model = self.model.model_validate(data, context={"limits": limits})
        except pydantic.ValidationError as exc:
            detail = [
                {"loc": [str(x) for x in err["loc"]], "msg": err["msg"], "type": err["type"]}
                for err in exc.errors(include_url=False, include_input=False)
            ]
            raise self._invalid(detail) from None
        try:
            # Files are opaque to the check below: leaving them out spares a base64 copy of each.
            tree = model.model_dump(by_alias=True, exclude=self.opaque or None)
            stored = model.model_dump_json(by_alias=True).encode()
        except pydantic_core.PydanticSerializationError as exc:  # e.g. a lone surrogate in a string
            raise self._invalid(
                [{"loc": [], "msg": f"cannot be stored as JSON: {exc}", "type": "value_error"}]
            ) from None
        # Checked on what is stored, so that strings coerced to floats ("NaN") and values inside
        # nested models are seen too (JSON would hold them as null); arrays and files are opaque here.
        fault = _fault(tree, 1, limits.max_json_depth)
        if fault is not None:
            raise self._invalid([{"loc": fault[0], "msg": fault[1], "type": fault[2]}])
        return _splice.splice(stored, deferred) if deferred else stored

    def _defer(self, data: dict[str, Any], limits: InputLimits, deferred: list[_splice.Deferred]) -> dict[str, Any]:
        """``data`` with each large binary value, once checked, replaced by a placeholder (added to ``deferred``)."""
        replaced: dict[str, Any] | None = None
        for param in self.params:
            if param.kind not in BINARY_KINDS:
                continue
            try:
                found = _large(param.kind, data.get(param.name), limits)
            except InputTooLarge as exc:
                raise self._invalid([{"loc": [param.name], "msg": str(exc), "type": "too_large"}]) from None
            except (ValueError, OSError) as exc:
                message = str(exc) if isinstance(exc, ValueError) else f"cannot read the value ({type(exc).__name__})"
                raise self._invalid([{"loc": [param.name], "msg": message, "type": "value_error"}]) from None
            if found is not None:
                replaced = replaced if replaced is not None else dict(data)
                replaced[param.name] = found[0]
                deferred.append(found[1])
        return data if replaced is None else replaced

    @functools.cached_property
    def opaque(self) -> set[str]:
        return {p.name for p in self.params if p.kind in BINARY_KINDS}

    @functools.cached_property
    def input_schema(self) -> dict[str, Any]:
        return self.model.model_json_schema(by_alias=True)

    def _invalid(self, detail: list[dict[str, Any]]) -> ValidationFailed:
        summary = "; ".join(f"{_where(d['loc'])}: {d['msg']}" for d in detail)
        return ValidationFailed(f"Invalid arguments for {self.name!r}: {summary}.", detail)

    def form_value(self, name: str, value: str, json_text: bool = False) -> Any:
        """A multipart text field: raw for ``str`` parameters (unless ``json_text``), else JSON if it parses."""
        param = self.by_name.get(name)
        if param is None or (param.is_text and not json_text) or param.kind in BINARY_KINDS:
            return value
        try:
            return pydantic_core.from_json(value, allow_inf_nan=False)
        except ValueError:
            return value

    # -- worker side -----------------------------------------------------------------------

    def load(self, stored: bytes, workdir: str) -> dict[str, Any]:
        """Rebuild the call's keyword arguments from stored JSON, in the worker."""
        model = self.model.model_validate_json(stored)
        kwargs: dict[str, Any] = {}
        for p in self.params:
            value = getattr(model, f"p_{p.name}")
            if value is not None and p.kind in BINARY_KINDS:
                value = self._materialize(p, value, workdir)
            kwargs[p.name] = value
        return kwargs

    @staticmethod
    def _materialize(param: Param, file: FileArg, workdir: str) -> Any:
        if param.kind == "bytes":
            return file.data
        if param.kind == "image":
            return load_image(file.data)  # safe formats only, whatever reached the store
        name = safe_filename(file.filename) or f"{param.name}.bin"
        target = pathlib.Path(workdir) / param.name
        target.mkdir(parents=True, exist_ok=True)
        path = target / name
        path.write_bytes(file.data)
        return path

    def dump_result(self, value: Any) -> tuple[bytes, str]:
        """Encode a return value: images as PNG, files with their own type, arrays typed, the rest as JSON."""
        if self.output_kind == "ndarray" and value is not None:
            return pydantic_core.to_json(array_to_wire(value)), "application/json"
        if _is_subclass(type(value), "PIL.Image", "Image"):
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            return buf.getvalue(), "image/png"
        if isinstance(value, os.PathLike):
            # The name travels in the type, for the server's Content-Disposition; the server
            # serves the file as an attachment, never as the type guessed here (server/surface.py).
            path = pathlib.Path(value)
            name = (safe_filename(path.name) or "result.bin").replace("\\", "\\\\").replace('"', '\\"')
            return (
                path.read_bytes(),
                f'{mimetypes.guess_type(path.name)[0] or "application/octet-stream"}; name="{name}"',
            )

        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value), "application/octet-stream"
        return pydantic_core.to_json(value, fallback=_json_fallback, inf_nan_mode="null"), "application/json"

    def describe(self) -> dict[str, Any]:
        return {
            "input": self.model.model_json_schema(by_alias=True),
            "output": {"kind": self.output_kind, "schema": self.output_schema},
            "files": [p.name for p in self.params if p.kind in BINARY_KINDS],
        }


def _large(kind: Kind, value: Any, limits: InputLimits) -> tuple[_Placeholder, _splice.Deferred] | None:
    """A placeholder and the deferred value for a file, image or bytes value over ``SPLICE_AT``; None for any other.

    Checked as pydantic would check it (base64 as strictly, an image opened from its header and
    verified), without a whole copy of it: an image sent as base64 is decoded to a temporary file.
    """
    text: Any = None
    filename: Any = None
    content_type: Any = None
    if isinstance(value, SpooledFileArg) and value.file is not None:
        if kind == "image":
            _verify_image_file(value.file, limits)
        deferred = _splice.from_file(value.file)
        filename, content_type = value.filename, value.content_type
    elif isinstance(value, FileArg) and not isinstance(value, _Placeholder) and len(value.data) > _splice.SPLICE_AT:
        if kind == "image":
            verify_image(value.data, limits.max_image_pixels)
        deferred = _splice.from_bytes(value.data)
        filename, content_type = value.filename, value.content_type
    else:
        if isinstance(value, dict) and isinstance(value.get("data"), str):
            text, filename, content_type = value["data"], value.get("filename"), value.get("content_type")
        elif isinstance(value, str):
            text = value
        if text is None or len(text) <= _splice.SPLICE_AT:
            return None
        if kind == "image":
            with tempfile.TemporaryFile() as decoded:
                deferred = _splice.from_base64(text, decoded)
                _verify_image_file(decoded, limits)
        else:
            deferred = _splice.from_base64(text)
    return _Placeholder(b"", safe_filename(filename), _content_type(content_type), deferred.token), deferred


def _verify_image_file(file: typing.IO[bytes], limits: InputLimits) -> None:
    """Check an image in a file, which stays open: Pillow closes the file it read, so it reads a duplicate."""
    with os.fdopen(os.dup(file.fileno()), "rb") as duplicate:
        duplicate.seek(0)
        verify_image(duplicate, limits.max_image_pixels)


def _yielded(annotation: Any) -> Any:
    """The item type of ``Iterator[T]``, ``Generator[T, ...]`` and their async forms (``Any`` if unsaid)."""
    args = typing.get_args(annotation)
    return args[0] if args else Any


def dump_item(value: Any) -> bytes:
    """One streamed item as JSON."""
    return pydantic_core.to_json(value, fallback=_json_fallback, inf_nan_mode="null")


def _pinned_dtype(name: str, pname: str, annotation: Any) -> Any:
    try:
        return annotated_dtype(annotation)
    except ValueError as exc:
        raise ServiceDefinitionError(f"Parameter {pname!r} of {name!r}: {exc}.") from None


_PLAIN = (str, int, bool, type(None))


def _where(loc: list[str]) -> str:
    if len(loc) > 6:
        return f"{'.'.join(loc[:3])}...{'.'.join(loc[-2:])}"
    return ".".join(loc) or "(body)"


def _fault(value: Any, depth: int, limit: int) -> tuple[list[str], str, str] | None:
    """Where a value cannot be stored faithfully: nesting past ``limit``, or a float that is not finite."""
    if isinstance(value, float):
        return None if math.isfinite(value) else ([], f"{value} is not a finite number; JSON has none", "finite_number")
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = enumerate(value)
    else:
        return None
    if depth > limit:
        return [], f"nested deeper than the limit of {limit} levels", "too_deep"
    for key, item in items:
        if type(item) in _PLAIN:
            continue
        fault = _fault(item, depth + 1, limit)
        if fault is not None:
            fault[0].insert(0, str(key))
            return fault
    return None


def _mistyped(value: Any, schema: Any, defs: dict[str, Any], loc: list[str]) -> tuple[list[str], str] | None:
    """Where a JSON value is not the type its schema names though pydantic would convert it (``true``
    or ``"1.5"`` for a number, ``1`` for a string): the published schema is the contract, and a
    client generated from it must not find the server looser than it says. Only plain ``type``
    keywords are judged; anything else (``anyOf``, formats, custom types) is left to pydantic.
    """
    if not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        return _mistyped(value, defs.get(schema["$ref"].rsplit("/", 1)[-1]), defs, loc)
    kind = schema.get("type")
    if kind in ("number", "integer") and (isinstance(value, bool) or not isinstance(value, (int, float))):
        if value is not None:
            return loc, f"expected {'an integer' if kind == 'integer' else 'a number'}, got {_sent(value)}"
    elif kind == "string" and not isinstance(value, str) and value is not None and "format" not in schema:
        return loc, f"expected a string, got {_sent(value)}"
    elif kind == "boolean" and not isinstance(value, bool) and value is not None:
        return loc, f"expected true or false, got {_sent(value)}"
    elif kind == "object" and isinstance(value, dict):
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key, schema.get("additionalProperties"))
            found = _mistyped(item, sub, defs, [*loc, str(key)])
            if found is not None:
                return found
    elif kind == "array" and isinstance(value, list):
        for index, item in enumerate(value):
            found = _mistyped(item, schema.get("items"), defs, [*loc, str(index)])
            if found is not None:
                return found
    return None


def _sent(value: Any) -> str:
    """What a client sent, as the client would name it: a file part is a file, not our ``FileArg``."""
    return "a file" if isinstance(value, FileArg) else type(value).__name__


def _json_fallback(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    raise TypeError(
        f"Cannot encode a {type(value).__name__} result as JSON; return JSON types, bytes, an image or a Path."
    )


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))
