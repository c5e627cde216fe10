"""The schemas ``/docs.json`` points to: the shared components, and each endpoint's input and result.

These shapes follow the codec (an endpoint's input from its pydantic model, whose ``$defs`` are
lifted into the document's components; its result from its return annotation) and change with it;
the operations that use them follow the routes, and ``openapi`` assembles those.
"""

from __future__ import annotations

import copy
from typing import Any

from .._wire import SAFE_IMAGE_FORMATS
from ..codec import ARRAY_SCHEMA
from ..service import Endpoint
from .bulk import DEFAULT_WAIT, MAX_IDS, MAX_WAIT
from .options import MAX_KEY, TAG_PATTERN

ERROR = {"$ref": "#/components/schemas/Error"}
KEY_SCHEMA = {"type": "string", "minLength": 1, "maxLength": MAX_KEY, "pattern": "^[\\x20-\\x7e]+$"}
TAG_SCHEMA = {"type": "string", "pattern": TAG_PATTERN}
STATUS = {"$ref": "#/components/schemas/TaskStatus"}
SUBMITTED = {"$ref": "#/components/schemas/Submitted"}
WORKER = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "host": {"type": "string"},
        "pid": {"type": "integer"},
        "routes": {"type": "array", "items": {"type": "string"}},
        "concurrency": {"type": "integer"},
        "state": {"type": "string", "enum": ["starting", "ready", "stopping"]},
        "started_at": {"type": "string", "format": "date-time"},
        "last_seen": {"type": "string", "format": "date-time"},
        "running": {"type": "array", "items": {"type": "string"}},
        "gpus": {"type": "array", "items": {"type": "string"}},
        "done": {"type": "integer"},
        "failed": {"type": "integer"},
    },
}
ATTACHMENT = {
    "Content-Disposition": {
        "description": "attachment, with the file's name: a file result is downloaded, never rendered.",
        "schema": {"type": "string"},
    }
}
SSE_EVENT = {
    "type": "object",
    "description": "One Server-Sent Event: status (the TaskStatus as JSON), progress, output, or end.",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}},
}
IMAGE_TYPES = ", ".join(f"image/{f.lower()}" for f in SAFE_IMAGE_FORMATS)

WAIT_MANY_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["task_ids"],
    "additionalProperties": False,
    "properties": {
        "task_ids": {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_IDS},
        "timeout": {
            "type": "number",
            "minimum": 0,
            "default": DEFAULT_WAIT,
            "description": f"Seconds to wait; more than {MAX_WAIT:g} waits {MAX_WAIT:g}.",
        },
        "min_done": {"type": "integer", "minimum": 1, "default": 1},
        "results": {"type": "boolean", "default": True},
    },
}
WAIT_MANY_RESPONSE: dict[str, Any] = {
    "type": "object",
    "required": ["tasks", "pending", "missing"],
    "properties": {
        "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/TaskOutcome"}},
        "pending": {"type": "array", "items": {"type": "string"}},
        "missing": {"type": "array", "items": {"type": "string"}},
    },
}


def shared_components() -> dict[str, Any]:
    """The components of every document, built afresh: each document adds its endpoints' inputs to them."""
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}, "detail": {"type": "array", "items": {"type": "object"}}},
        },
        "TaskStatus": {
            "type": "object",
            "properties": {
                "task_id": {"type": "string"},
                "status": {"type": "string", "enum": ["pending", "in_progress", "success", "failure", "cancelled"]},
                "created_at": {"type": ["string", "null"], "format": "date-time"},
                "started_at": {"type": ["string", "null"], "format": "date-time"},
                "completed_at": {"type": ["string", "null"], "format": "date-time"},
                "attempts": {"type": "integer"},
                "max_attempts": {"type": "integer"},
                "error": {"type": ["string", "null"]},
                "worker": {"type": ["string", "null"]},
                "route": {"type": "string"},
                "priority": {"type": "integer"},
                "run_at": {"type": ["string", "null"], "format": "date-time"},
                "position": {
                    "type": ["integer", "null"],
                    "description": "Pending: how many tasks of the route would be claimed before it.",
                },
                "queue_time": {"type": ["number", "null"], "description": "Seconds from due to start."},
                "run_time": {"type": ["number", "null"], "description": "Seconds the last attempt ran."},
                "batch_size": {"type": ["integer", "null"]},
                "errors": {
                    "type": "array",
                    "description": "One entry per failed attempt.",
                    "items": {
                        "type": "object",
                        "properties": {
                            "attempt": {"type": "integer"},
                            "type": {"type": "string"},
                            "message": {"type": "string"},
                            "at": {"type": "string", "format": "date-time"},
                            "traceback": {
                                "type": "string",
                                "description": "Where the task's code raised: its frames, the worker's left out.",
                            },
                        },
                    },
                },
                "retry_of": {"type": ["string", "null"]},
                "tags": {"type": "object", "additionalProperties": {"type": "string"}},
                "progress": {"type": ["object", "null"]},
                "expires_at": {"type": ["string", "null"], "format": "date-time"},
                "deadline": {"type": ["string", "null"], "format": "date-time"},
                "webhook": {
                    "type": ["object", "null"],
                    "properties": {
                        "url": {"type": "string"},
                        "state": {"enum": ["pending", "delivered", "failed"]},
                        "attempts": {"type": "integer"},
                        "last_error": {"type": ["string", "null"]},
                    },
                },
            },
        },
        "Submitted": {
            "type": "object",
            "properties": {"task_id": {"type": "string"}, "status": {"type": "string"}},
        },
        "NDArray": ARRAY_SCHEMA,
        "TaskOutcome": {
            "allOf": [STATUS],
            "properties": {"result": {}, "result_url": {"type": "string"}},
        },
    }


def result_response(ep: Endpoint) -> dict[str, Any]:
    kind = ep.codec.output_kind
    if kind == "ndarray":
        content = {"application/json": {"schema": {"$ref": "#/components/schemas/NDArray"}}}
    elif kind == "image":
        content = {"image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}}}
    elif kind in ("file", "bytes"):
        content = {
            "application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}
        }
        return {"description": "The result, as an attachment.", "content": content, "headers": ATTACHMENT}
    else:
        content = {"application/json": {"schema": _nullable_numbers(ep.codec.output_schema or {})}}
    return {"description": "The result.", "content": content}


def _nullable_numbers(node: Any) -> Any:
    """A result schema where each ``number`` may be ``null``: NaN and Infinity go out as null."""
    if isinstance(node, list):
        return [_nullable_numbers(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable_numbers(v) for k, v in node.items()}
    if out.get("type") == "number":
        out["type"] = ["number", "null"]
    return out


def multipart_encoding(ep: Endpoint) -> dict[str, Any]:
    """The content types of each file part of a multipart body."""
    types = {"image": IMAGE_TYPES, "file": "application/octet-stream", "bytes": "application/octet-stream"}
    types["ndarray"] = "application/x-npy, application/json"
    return {p.name: {"contentType": types[p.kind]} for p in ep.codec.params if p.kind in types}


def lift_defs(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """Move pydantic's ``$defs`` into ``components/schemas`` and point the refs there."""
    schema = copy.deepcopy(schema)
    for name, sub in schema.pop("$defs", {}).items():
        components[name] = _retarget(sub)
    return _retarget(schema)  # type: ignore[no-any-return]


def _retarget(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: (v.replace("#/$defs/", "#/components/schemas/") if k == "$ref" and isinstance(v, str) else _retarget(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_retarget(v) for v in node]
    return node
