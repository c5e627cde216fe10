"""``/schema.json`` (what the clients read) and ``/docs.json`` (OpenAPI 3.1), from the signatures."""

from __future__ import annotations

import copy
from typing import Any

from .. import __version__
from .._wire import DEFAULT_MAX_JSON_DEPTH, SAFE_IMAGE_FORMATS
from ..codec import ARRAY_SCHEMA
from ..service import Endpoint, Service

ERROR = {"$ref": "#/components/schemas/Error"}
STATUS = {"$ref": "#/components/schemas/TaskStatus"}
TASK_ID_PARAM = {"name": "task_id", "in": "query", "required": True, "schema": {"type": "string"}}
IMAGE_TYPES = ", ".join(f"image/{f.lower()}" for f in SAFE_IMAGE_FORMATS)
DESCRIPTION = (
    "Arguments are a JSON object, or multipart/form-data when files travel (text fields are read as JSON "
    "unless the parameter is a string). Files and bytes are file parts, or base64 strings in JSON. Images "
    f"must be {', '.join(SAFE_IMAGE_FORMATS)}. numpy arrays are a nested list, the typed object NDArray "
    '({"dtype", "shape", "data"}, data a nested list or base64 of the raw little-endian bytes), or a .npy '
    "part (numpy.save, no pickles); array results are NDArray with base64 data. Refused with 422 at submit: "
    f"nesting deeper than {DEFAULT_MAX_JSON_DEPTH} levels, NaN, Infinity and numbers beyond float range, "
    "text that is not Unicode, "
    "dtypes outside NDArray's list, and images or arrays over the server's limits (--max-image-pixels, "
    "--max-array-bytes, --max-array-elements; detail type too_large). Bodies over --max-body-size get 413."
)


def service_schema(service: Service) -> dict[str, Any]:
    return {
        "name": service.name,
        "version": __version__,
        "endpoints": [
            {"name": ep.name, "route": ep.route, "task": ep.is_task, **ep.codec.describe()} for ep in service.endpoints
        ],
    }


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _result_response(ep: Endpoint) -> dict[str, Any]:
    kind = ep.codec.output_kind
    if kind == "ndarray":
        content = {"application/json": {"schema": {"$ref": "#/components/schemas/NDArray"}}}
    elif kind == "image":
        content = {"image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}}}
    elif kind in ("file", "bytes"):
        content = {
            "application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}
        }
    else:
        content = {"application/json": {"schema": ep.codec.output_schema or {}}}
    return {"description": "The result.", "content": content}


def _encoding(ep: Endpoint) -> dict[str, Any]:
    """The content types of each file part of a multipart body."""
    types = {"image": IMAGE_TYPES, "file": "application/octet-stream", "bytes": "application/octet-stream"}
    types["ndarray"] = "application/x-npy, application/json"
    return {p.name: {"contentType": types[p.kind]} for p in ep.codec.params if p.kind in types}


def _lift_defs(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
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


def openapi_document(service: Service) -> dict[str, Any]:
    components: dict[str, Any] = {
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
                "error": {"type": ["string", "null"]},
            },
        },
        "Submitted": {
            "type": "object",
            "properties": {"task_id": {"type": "string"}, "status": {"type": "string"}},
        },
        "NDArray": ARRAY_SCHEMA,
    }
    paths: dict[str, Any] = {}
    for ep in service.endpoints:
        input_name = ep.codec.model.__name__
        components[input_name] = _lift_defs(ep.codec.describe()["input"], components)
        ref = {"$ref": f"#/components/schemas/{input_name}"}
        multipart: dict[str, Any] = {"schema": ref}
        if encoding := _encoding(ep):
            multipart["encoding"] = encoding
        body = {
            "required": True,
            "content": {"application/json": {"schema": ref}, "multipart/form-data": multipart},
        }
        tag = [ep.name]
        invalid = _error("Invalid input, or a value over a limit; detail lists each field.")
        paths[ep.route] = {
            "post": {
                "summary": f"Run {ep.name} and wait for its result",
                "operationId": f"{ep.name}_call",
                "tags": tag,
                "requestBody": body,
                "responses": {
                    "200": _result_response(ep),
                    "422": invalid,
                    "413": _error("The body is larger than --max-body-size."),
                    "500": _error("The call failed."),
                    "503": _error("Queue unavailable."),
                },
            }
        }
        if not ep.is_task:
            continue
        by_id = {"parameters": [TASK_ID_PARAM], "tags": tag}
        not_found = _error("No such task on this route.")
        paths[f"{ep.route}/submit"] = {
            "post": {
                "summary": f"Queue {ep.name}",
                "operationId": f"{ep.name}_submit",
                "tags": tag,
                "requestBody": body,
                "responses": {
                    "200": _json("Queued.", {"$ref": "#/components/schemas/Submitted"}),
                    "422": invalid,
                    "413": _error("The body is larger than --max-body-size."),
                    "503": _error("Queue unavailable."),
                },
            }
        }
        paths[f"{ep.route}/submit_many"] = {
            "post": {
                "summary": f"Queue many {ep.name} tasks, all or none",
                "operationId": f"{ep.name}_submit_many",
                "tags": tag,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "array", "items": ref}}},
                },
                "responses": {
                    "200": _json(
                        "Queued, in order.",
                        {
                            "type": "object",
                            "properties": {
                                "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Submitted"}}
                            },
                        },
                    ),
                    "422": invalid,
                    "503": _error("Queue unavailable."),
                },
            }
        }
        paths[f"{ep.route}/status"] = {
            "get": {
                **by_id,
                "operationId": f"{ep.name}_status",
                "responses": {"200": _json("The status.", STATUS), "400": _error("No task_id."), "404": not_found},
            }
        }
        paths[f"{ep.route}/get"] = {
            "get": {
                **by_id,
                "operationId": f"{ep.name}_get",
                "responses": {"200": _result_response(ep), "404": not_found, "409": _error("Not successful (yet).")},
            }
        }
        wait_params = [TASK_ID_PARAM, {"name": "timeout", "in": "query", "schema": {"type": "number", "default": 30}}]
        paths[f"{ep.route}/wait"] = {
            "get": {
                "tags": tag,
                "parameters": wait_params,
                "operationId": f"{ep.name}_wait",
                "responses": {"200": _json("The status, once terminal or at the timeout.", STATUS), "404": not_found},
            }
        }
        for action, summary in (("retry", "Queue a new task with the same arguments"), ("cancel", "Cancel the task")):
            op = {
                **by_id,
                "summary": summary,
                "responses": {
                    "200": _json("Done.", {"$ref": "#/components/schemas/Submitted"}),
                    "404": not_found,
                    "409": _error("Not allowed in the task's state."),
                },
            }
            paths[f"{ep.route}/{action}"] = {
                "post": {**op, "operationId": f"{ep.name}_{action}"},
                "put": {**op, "operationId": f"{ep.name}_{action}_put"},
            }
    plain = {"200": {"description": "OK"}}
    for path in ("/schema.json", "/docs.json", "/healthz", "/readyz", "/metrics"):
        paths[path] = {"get": {"operationId": path.strip("/").replace(".", "_"), "responses": plain}}
    return {
        "openapi": "3.1.0",
        "info": {"title": service.name, "version": __version__, "description": DESCRIPTION},
        "paths": paths,
        "components": {"schemas": components},
    }
