"""Request bodies into validated, storable arguments: JSON, multipart and form-urlencoded.

Every fault in what a client sends is its own (422, 413 or 415 with a message), never a 500:
the body is bounded before it is read, JSON is parsed with non-finite numbers refused and
a bounded depth, multipart is parsed from the bytes already read with bounded parts, and
text must be UTF-8. Small JSON bodies are validated on the event loop, as submit latency
matters; large bodies, and endpoints taking files, images or arrays, in a thread, so that
one costly request cannot stall every other one (and the health checks).
"""

from __future__ import annotations

import tempfile
from typing import IO, Any
from urllib.parse import parse_qsl

import anyio
import anyio.to_thread
import pydantic_core
from python_multipart.multipart import Field, File, FormParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import Request

from .._splice import close_all
from .._types import Args
from .._wire import InputLimits
from ..codec import Codec, FileArg, SpooledFileArg
from ..exceptions import PayloadTooLarge, ValidationFailed

INLINE_BODY = 64 * 1024  # larger bodies are validated in a thread
SPOOL_AT = 1024 * 1024  # larger bodies are read into a temporary file, not a list of chunks
DEFAULT_BODY_TIMEOUT = 30.0  # seconds a body may stop arriving before the request gets 408
MAX_BATCH = 10_000  # argument objects in one submit_many
MAX_FORM_PARTS = 1000  # fields and files in one form
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# Set in the scope of a request whose form text fields are all JSON, str ones too (BentoML's client writes them so).
JSON_FORM_FIELDS = "taskserve.json_form_fields"
ACCEPTED = "application/json, or multipart/form-data (files), or application/x-www-form-urlencoded"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes whether or not a length was sent.

    A client that hangs up meanwhile raises starlette's ``ClientDisconnect``, answered quietly;
    one that stops sending for ``body_timeout`` seconds (the app's, ``--body-timeout``) gets 408.
    """
    received = await _receive(request, limit)
    if isinstance(received, bytes):
        body = received
    else:
        with received:
            body = received.read()
    request._body = body  # lets request.form() parse what we already read
    return body


async def _receive(request: Request, limit: int) -> bytes | IO[bytes]:
    """The body as bytes, or, past ``SPOOL_AT`` bytes, as an unnamed temporary file at its start
    (the caller closes it): a large upload is never a growing list of chunks in memory, and a
    multipart one is parsed from the file without ever being whole in memory."""
    length = request.headers.get("content-length")
    too_large = PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes; send a smaller one.")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    timeout: float = getattr(request.app.state, "body_timeout", DEFAULT_BODY_TIMEOUT)
    chunks: list[bytes] = []
    size = 0
    spool: IO[bytes] | None = None
    try:
        with anyio.CancelScope() as scope:
            # One scope for the whole read, its deadline pushed on by each chunk: an idle timeout
            # (a slow but steady upload is fine) for the price of one cancel scope per request.
            scope.deadline = anyio.current_time() + timeout
            async for chunk in request.stream():
                scope.deadline = anyio.current_time() + timeout
                size += len(chunk)
                if size > limit:
                    raise too_large
                if spool is not None:
                    spool.write(chunk)
                elif size > SPOOL_AT:
                    spool = tempfile.TemporaryFile()  # no name on disk: nothing is left behind
                    spool.writelines(chunks)
                    spool.write(chunk)
                    chunks.clear()
                else:
                    chunks.append(chunk)
        if scope.cancelled_caught:
            raise HTTPException(
                408,
                f"The request body stopped arriving for {timeout:g}s; the request is abandoned. Send it again.",
                headers={"Connection": "close"},
            )
    except BaseException:
        if spool is not None:
            spool.close()
        raise
    if spool is not None:
        spool.seek(0)
        return spool
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _content_type(request: Request) -> str:
    """The media type of the body, lower case, without parameters ("" when none was sent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _is_json(ctype: str) -> bool:
    return ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))


def _unsupported(ctype: str, accepted: str) -> HTTPException:
    sent = f"Content-Type {ctype!r}" if ctype else "no Content-Type"
    hint = ""
    if ctype in ("", "text/plain", "application/x-www-form-urlencoded"):
        hint = " (with curl: -H 'content-type: application/json')"
    return HTTPException(415, f"Send the body as {accepted}{hint}; it came with {sent}.")


async def read_json(request: Request, expected: type, limit: int, limits: InputLimits | None = None) -> Any:
    """A body that must be JSON: refused with 415 under any other Content-Type, as a web page
    could send text or a form to this server from another origin without asking (CORS
    lets such "simple" requests through), but never ``application/json``. An empty body needs none.
    """
    ctype = _content_type(request)
    length = request.headers.get("content-length", "0")
    if not _is_json(ctype) and length != "0" and not (length.isdigit() and int(length) > limit):
        raise _unsupported(ctype, "application/json")  # (a body over the limit is told that first: 413)
    body = await read_body(request, limit)
    if body and not _is_json(ctype):
        raise _unsupported(ctype, "application/json")
    return parse_json(body, expected, limits)


def _invalid(message: str, kind: str = "value_error") -> ValidationFailed:
    return ValidationFailed(message, [{"loc": [], "msg": message, "type": kind}])


def parse_json(body: bytes, expected: type, limits: InputLimits | None = None) -> Any:
    """The body as JSON of the ``expected`` type (dict or list); NaN, Infinity and lone surrogates refused."""
    depth = (limits or InputLimits()).max_json_depth
    if not body.strip():
        body = b"{}" if expected is dict else b"null"
    try:
        data = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        text = str(exc)
        if "recursion limit" in text:
            raise _invalid(f"The request body is nested deeper than the limit of {depth} levels.", "too_deep") from None
        if "hex escape" in text or "surrogate" in text:
            text += "; a \\uD800-\\uDFFF escape must be half of a surrogate pair"
        elif b"NaN" in body or b"Infinity" in body:
            text += "; NaN and Infinity are not JSON numbers"
        raise ValidationFailed(
            f"The request body is not valid JSON ({text}).", [{"loc": [], "msg": text, "type": "json_invalid"}]
        ) from None
    if not isinstance(data, expected):
        what = "object of arguments" if expected is dict else "array of argument objects"
        raise _invalid(f"The request body must be a JSON {what}.", "type_error")
    return data


def _media_type(request: Request, body: bytes) -> str:
    """How to read a body of arguments: JSON only under a JSON type, forms only as forms.

    A text or form body is never read as JSON, even when it looks like JSON: a page of any
    origin may POST one without asking. An empty body (an endpoint without arguments) needs no type.
    """
    ctype = _content_type(request)
    if _is_json(ctype):
        return "application/json"
    if ctype in FORM_TYPES:
        if ctype == FORM_TYPES[1] and body.lstrip()[:1] in (b"{", b"["):
            raise _unsupported(ctype, ACCEPTED)  # curl -d '{...}' without a JSON Content-Type
        return ctype
    if not body.strip():
        return "application/json"
    raise _unsupported(ctype, ACCEPTED)


def _inline(body: bytes, codec: Codec) -> bool:
    return len(body) <= INLINE_BODY and not codec.binary_inputs


async def read_arguments(request: Request, codec: Codec, limits: InputLimits, max_body: int) -> Args:
    """The validated, storable arguments of a submit or a direct call."""
    if not (_is_json(_content_type(request)) or _content_type(request) in FORM_TYPES):
        length = request.headers.get("content-length", "0")
        if length != "0" and not (length.isdigit() and int(length) > max_body):  # 413 comes first
            raise _unsupported(_content_type(request), ACCEPTED)  # before reading what would be refused
    content_type = request.headers.get("content-type", "")
    json_text = request.scope.get(JSON_FORM_FIELDS, False)
    if _content_type(request) == FORM_TYPES[0]:
        # Straight from the spooled file, if it is one, to the parts; always in a thread (files).
        source = await _receive(request, max_body)
        return await anyio.to_thread.run_sync(_multipart_arguments, source, content_type, codec, limits, json_text)
    body = await read_body(request, max_body)
    ctype = _media_type(request, body)
    if _inline(body, codec):
        return arguments(body, ctype, content_type, codec, limits, json_text)
    return await anyio.to_thread.run_sync(arguments, body, ctype, content_type, codec, limits, json_text)


def _multipart_arguments(
    source: bytes | IO[bytes], content_type: str, codec: Codec, limits: InputLimits, json_text: bool = False
) -> Args:
    kept: list[File] = []
    try:
        try:
            data = {
                n: v if isinstance(v, FileArg) else codec.form_value(n, v, json_text)
                for n, v in _multipart(source, content_type, kept)
            }
        finally:
            if not isinstance(source, bytes):
                source.close()
        return codec.validate(data, limits)
    finally:
        for file in kept:  # large file parts, read from their files by validate
            file.close()


def arguments(
    body: bytes, ctype: str, content_type: str, codec: Codec, limits: InputLimits, json_text: bool = False
) -> Args:
    if ctype in FORM_TYPES:
        return codec.validate(form_data(body, ctype, content_type, codec, json_text), limits)
    if codec.root is not None and body.strip():
        # Root input: the body is the value itself, unless it is the object of that one argument.
        value = parse_json(body, object, limits)
        if not (isinstance(value, dict) and set(value) == {codec.root}):
            value = {codec.root: value}
        return codec.validate(value, limits)
    return codec.validate(parse_json(body, dict, limits), limits)


async def read_many(request: Request, codec: Codec, limits: InputLimits, max_body: int) -> list[Args]:
    """The validated arguments of each item of a submit_many, all or none."""
    ctype = _content_type(request)
    if not _is_json(ctype):
        raise _unsupported(ctype, "a JSON array (application/json)")
    body = await read_body(request, max_body)
    if _inline(body, codec):
        return many_arguments(body, codec, limits)
    return await anyio.to_thread.run_sync(many_arguments, body, codec, limits)


def many_arguments(body: bytes, codec: Codec, limits: InputLimits) -> list[Args]:
    items = parse_json(body, list, limits)
    if len(items) > MAX_BATCH:
        raise ValidationFailed(f"At most {MAX_BATCH} tasks per submit_many; got {len(items)}. Split the batch.")
    args: list[Args] = []
    errors: list[dict[str, Any]] = []
    try:
        for index, item in enumerate(items):
            try:
                args.append(codec.validate(item, limits))
            except ValidationFailed as exc:
                errors.extend({"index": index, **d} for d in exc.detail)
        if errors:
            where = ", ".join(
                sorted({f"item {e['index']}" + (f" field {'.'.join(e['loc'])}" if e["loc"] else "") for e in errors})
            )
            raise ValidationFailed(f"No task was submitted: invalid arguments in {where}.", errors)
    except BaseException:
        close_all(args)  # the valid items' large arguments, in files no enqueue will close
        raise
    return args


# -- forms ---------------------------------------------------------------------------------


def form_data(body: bytes, ctype: str, content_type: str, codec: Codec, json_text: bool = False) -> dict[str, Any]:
    """A form's fields as arguments: files as ``FileArg``, text as ``Codec.form_value`` reads it.

    ``json_text``: every text field is JSON (a ``str`` one too, quoted), as BentoML's client sends them.
    """
    data: dict[str, Any] = {}
    parts = _urlencoded(body) if ctype == "application/x-www-form-urlencoded" else _multipart(body, content_type)
    for name, value in parts:
        data[name] = value if isinstance(value, FileArg) else codec.form_value(name, value, json_text)
    return data


def _urlencoded(body: bytes) -> list[tuple[str, str]]:
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_PARTS, errors="strict")
    except UnicodeDecodeError:
        raise _invalid("The form is not valid UTF-8; send text fields as UTF-8.") from None
    except ValueError:
        raise _invalid(f"The form has more than {MAX_FORM_PARTS} fields.", "too_large") from None


def _multipart(
    source: bytes | IO[bytes], content_type: str, kept: list[File] | None = None
) -> list[tuple[str, str | FileArg]]:
    """Parse a multipart body (bytes, or the spooled file) without an event loop.

    A file part over ``SPOOL_AT`` bytes goes to a temporary file of python-multipart's own, under
    a random name (never the one the client gave), and is read from it once; or, given ``kept``,
    is left there as a ``SpooledFileArg`` (its file added to ``kept``, for the caller to close).
    """
    keep_files = kept is not None
    kept = kept if kept is not None else []
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise _invalid("The multipart/form-data request has no boundary in its Content-Type.")
    parts: list[tuple[str, str | FileArg]] = []

    def add(name: bytes | None, value: str | FileArg) -> None:
        if len(parts) >= MAX_FORM_PARTS:
            raise _invalid(f"The form has more than {MAX_FORM_PARTS} parts.", "too_large")
        parts.append(((name or b"").decode("utf-8", "replace"), value))

    def on_field(field: Field) -> None:
        name = (field.field_name or b"").decode("utf-8", "replace")
        try:
            add(field.field_name, (field.value or b"").decode("utf-8"))
        except UnicodeDecodeError:
            raise ValidationFailed(
                f"The form field {name!r} is not valid UTF-8; send text as UTF-8, or as a file.",
                [{"loc": [name], "msg": "not valid UTF-8", "type": "unicode_error"}],
            ) from None

    def on_file(file: File) -> None:
        filename = file.file_name.decode("utf-8", "replace") if file.file_name else None
        if keep_files and not file.in_memory:
            # Left in its file, which Codec.validate encodes from in chunks; the caller closes it.
            kept.append(file)
            add(file.field_name, SpooledFileArg(b"", filename, file.content_type, file.file_object, file.size))
            return
        file.file_object.seek(0)
        data = file.file_object.read()
        file.close()
        add(file.field_name, FileArg(data, filename, file.content_type))

    config = {"MAX_MEMORY_FILE_SIZE": SPOOL_AT, "UPLOAD_KEEP_FILENAME": False, "UPLOAD_KEEP_EXTENSIONS": False}
    try:
        # Made inside: python-multipart refuses a boundary it cannot use (over 256 characters) here.
        parser = FormParser("multipart/form-data", on_field, on_file, boundary=boundary, config=config)
        if isinstance(source, bytes):
            parser.write(source)
        else:
            while chunk := source.read(SPOOL_AT):
                parser.write(chunk)
        parser.finalize()
    except (ValueError, OSError) as exc:
        if isinstance(exc, ValidationFailed):
            raise
        raise _invalid(f"The multipart/form-data body cannot be parsed ({exc}).") from None
    return parts
