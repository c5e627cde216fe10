"""Turning HTTP input into validated, storable arguments, and results into bytes.

Arguments are validated in the API process against a pydantic model built from the
signature, then stored as JSON: the queue never holds a pickle, and nothing received over
HTTP is unpickled or evaluated. Files, images, bytes and arrays travel inside that JSON
(base64 or nested lists) and become real Python objects again only in the worker.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import io
import mimetypes
import os
import pathlib
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import pydantic
import pydantic_core
from pydantic import ConfigDict, Field, PlainSerializer, PlainValidator, WithJsonSchema

from .exceptions import ServiceDefinitionError, ValidationFailed

Kind = Literal["json", "image", "file", "bytes", "ndarray"]
BINARY_KINDS = frozenset({"image", "file", "bytes"})


@dataclass
class FileArg:
    """An uploaded file as stored in the queue: raw bytes plus what the client said of them."""

    data: bytes
    filename: str | None = None
    content_type: str | None = None


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
    if _is_subclass(inner, "numpy", "ndarray"):
        return "ndarray"
    return "json"


# -- pydantic types for the binary kinds ---------------------------------------------------


def _to_file(value: Any) -> FileArg:
    if isinstance(value, FileArg):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return FileArg(bytes(value))
    if isinstance(value, str):
        try:
            return FileArg(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise ValueError("expected a file upload (multipart) or a base64-encoded string") from None
    if isinstance(value, dict) and isinstance(value.get("data"), str):
        stored = _to_file(value["data"])
        return FileArg(stored.data, value.get("filename"), value.get("content_type"))
    raise ValueError("expected a file upload (multipart) or a base64-encoded string")


def _to_image_file(value: Any) -> FileArg:
    file = _to_file(value)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(file.data)) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ValueError("expected an image file (PNG, JPEG, ...) that Pillow can open") from None
    return file


def _dump_file(file: FileArg) -> dict[str, Any]:
    return {"data": base64.b64encode(file.data).decode(), "filename": file.filename, "content_type": file.content_type}


def _to_array_spec(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict) and "data" in value:
        arr = np.asarray(value["data"], dtype=value.get("dtype"))
    else:
        try:
            arr = np.asarray(value)
        except ValueError:
            raise ValueError("expected a rectangular nested list of numbers") from None
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise ValueError("expected a rectangular nested list of numbers")
    return arr


def _dump_array(arr: Any) -> dict[str, Any]:
    return {"dtype": str(arr.dtype), "data": arr.tolist()}


_BINARY_SCHEMA = {"type": "string", "format": "binary", "description": "A file upload (multipart) or base64 in JSON."}
FileType = Annotated[
    FileArg, PlainValidator(_to_file), PlainSerializer(_dump_file, when_used="json"), WithJsonSchema(_BINARY_SCHEMA)
]
ImageType = Annotated[
    FileArg,
    PlainValidator(_to_image_file),
    PlainSerializer(_dump_file, when_used="json"),
    WithJsonSchema({**_BINARY_SCHEMA, "contentMediaType": "image/*"}),
]
ArrayType = Annotated[
    Any,
    PlainValidator(_to_array_spec),
    PlainSerializer(_dump_array, when_used="json"),
    WithJsonSchema({"type": "array", "items": {}, "description": "A nested list of numbers (an n-d array)."}),
]
_FIELD_TYPES: dict[str, Any] = {"image": ImageType, "file": FileType, "bytes": FileType, "ndarray": ArrayType}


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
                field_type = _FIELD_TYPES[kind]
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

    # -- API side --------------------------------------------------------------------------

    def validate(self, data: Any) -> bytes:
        """Validate client arguments; return the JSON to store. Raises ``ValidationFailed``."""
        if not isinstance(data, dict):
            raise ValidationFailed(
                f"The arguments of {self.name!r} must be a JSON object of parameter names to values.",
                [{"loc": [], "msg": "expected an object", "type": "object_type"}],
            )
        try:
            model = self.model.model_validate(data)
        except pydantic.ValidationError as exc:
            detail = [
                {"loc": [str(x) for x in err["loc"]], "msg": err["msg"], "type": err["type"]}
                for err in exc.errors(include_url=False, include_input=False)
            ]
            summary = "; ".join(f"{'.'.join(d['loc']) or '(body)'}: {d['msg']}" for d in detail)
            raise ValidationFailed(f"Invalid arguments for {self.name!r}: {summary}.", detail) from None
        return model.model_dump_json(by_alias=True).encode()

    def form_value(self, name: str, value: str) -> Any:
        """A multipart text field: raw for ``str`` parameters, else JSON if it parses."""
        param = self.by_name.get(name)
        if param is None or param.is_text or param.kind in BINARY_KINDS:
            return value
        try:
            return pydantic_core.from_json(value)
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
            from PIL import Image

            img = Image.open(io.BytesIO(file.data))
            img.load()
            return img
        name = os.path.basename(file.filename or "") or f"{param.name}.bin"
        target = pathlib.Path(workdir) / param.name
        target.mkdir(parents=True, exist_ok=True)
        path = target / name
        path.write_bytes(file.data)
        return path

    def dump_result(self, value: Any) -> tuple[bytes, str]:
        """Encode a return value: images as PNG, files with their own type, the rest as JSON."""
        if _is_subclass(type(value), "PIL.Image", "Image"):
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            return buf.getvalue(), "image/png"
        if isinstance(value, os.PathLike):
            path = pathlib.Path(value)
            return path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value), "application/octet-stream"
        return pydantic_core.to_json(value, fallback=_json_fallback), "application/json"

    def describe(self) -> dict[str, Any]:
        return {
            "input": self.model.model_json_schema(by_alias=True),
            "output": {"kind": self.output_kind, "schema": self.output_schema},
            "files": [p.name for p in self.params if p.kind in BINARY_KINDS],
        }


def _json_fallback(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    raise TypeError(
        f"Cannot encode a {type(value).__name__} result as JSON; return JSON types, bytes, an image or a Path."
    )


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))
