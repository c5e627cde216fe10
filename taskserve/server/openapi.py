"""``/schema.json`` (what the clients read) and ``/docs.json`` (OpenAPI 3.1), from the signatures.

This module assembles the document: each route's operations, their parameters and answers;
the schemas they point to are built in ``openapi_schemas``.
"""

from __future__ import annotations

from typing import Any

from .. import __version__
from .._wire import DEFAULT_MAX_JSON_DEPTH, SAFE_IMAGE_FORMATS
from ..service import Endpoint, Service
from . import bentoml_wire, ui
from .bulk import INLINE_BUDGET, INLINE_RESULT, MAX_IDS, MAX_WAIT
from .events import EVENT_ID_PATTERN
from .openapi_schemas import (
    ERROR,
    KEY_SCHEMA,
    SSE_EVENT,
    STATUS,
    SUBMITTED,
    TAG_SCHEMA,
    WAIT_MANY_REQUEST,
    WAIT_MANY_RESPONSE,
    WORKER,
    lift_defs,
    multipart_encoding,
    result_response,
    shared_components,
)
from .options import MAX_DELAY, MAX_TAGS, MAX_TIMEOUT, MAX_URL, PRIORITY_RANGE, WEBHOOK_PATTERN

DEFAULT_CALL_TIMEOUT = 300.0  # a direct call waits at most this (or its endpoint's timeout + 30 s)
TASK_ID_PARAM = {"name": "task_id", "in": "query", "required": True, "schema": {"type": "string", "minLength": 1}}
OPTION_PARAMS: list[dict[str, Any]] = [  # options of one submission (server/options.py)
    {
        "name": "priority",
        "in": "query",
        "description": "Higher is claimed first.",
        "schema": {"type": "integer", "minimum": PRIORITY_RANGE[0], "maximum": PRIORITY_RANGE[1]},
    },
    {
        "name": "delay",
        "in": "query",
        "description": "Seconds before it may start. With run_at as well: the later of the two.",
        "schema": {"type": "number", "minimum": 0, "maximum": MAX_DELAY},
    },
    {
        "name": "run_at",
        "in": "query",
        "description": "Not started before this time (no offset: UTC).",
        "schema": {"type": "string", "format": "date-time"},
    },
    {
        "name": "timeout",
        "in": "query",
        "description": "Seconds an attempt may run before it is stopped (TimeoutError).",
        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT},
    },
    {
        "name": "ttl",
        "in": "query",
        "description": "Seconds it may wait to start once due; not started by then, it fails (Expired) unrun.",
        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_DELAY},
    },
    {
        "name": "deadline",
        "in": "query",
        "description": "Not finished by this time, queued or running: stopped, failure (DeadlineExceeded). "
        "Or the header Cancel-After.",
        "schema": {"type": "string", "format": "date-time"},
    },
    {
        "name": "Cancel-After",
        "in": "header",
        "description": "Seconds from now: a deadline. With the deadline option as well: the earlier of the two.",
        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT},
    },
    {
        "name": "idempotency_key",
        "in": "query",
        "description": "The same key on this route with the same arguments answers the same task "
        "(header Idempotent-Replayed: true); with other arguments 409. Kept as long as the task. "
        "Or the header Idempotency-Key, not listed as a parameter here as a document cannot say that "
        "given both they must be equal (else 422). "
        "On submit_many, item i is keyed KEY#i.",
        "schema": KEY_SCHEMA,
    },
    {
        "name": "webhook",
        "in": "query",
        "description": "An http(s) URL POSTed a signed task.completed message when the task ends (docs/webhooks.md).",
        "schema": {"type": "string", "pattern": WEBHOOK_PATTERN, "maxLength": MAX_URL},
    },
    {
        "name": "tag",
        "in": "query",
        "description": "KEY:VALUE labels, shown in the status; each key once.",
        "schema": {"type": "array", "items": TAG_SCHEMA, "maxItems": MAX_TAGS, "uniqueItems": True},
        "style": "form",
        "explode": True,
    },
]
REPLAYED = {
    "Idempotent-Replayed": {
        "description": "true when an idempotency key named an earlier task, which is the one answered.",
        "schema": {"type": "string", "enum": ["true"]},
    }
}
FULL = {
    "description": "The route holds its max_queue pending tasks; nothing was queued. retry_after (and the "
    "Retry-After header) estimate the wait from how fast the queue drains.",
    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error", "retry_after"],
                "properties": {"error": {"type": "string"}, "retry_after": {"type": "integer"}},
            }
        }
    },
}
UNAVAILABLE = {
    "description": "Nothing was queued: the broker is unreachable, or the task store is busy (a process has "
    "held SQLite's write lock past --busy-timeout; its supervisor replaces a worker frozen so). Retry after "
    "the Retry-After header's seconds.",
    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    "content": {"application/json": {"schema": ERROR}},
}
UNSUPPORTED = (
    "The body came with a Content-Type other than the request body's (a JSON body must be sent as "
    "application/json; a text or form body is never read as JSON)."
)
CONFLICT = "The idempotency key names a task of this route with other arguments (task_id says which)."
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
            {"name": ep.name, "route": ep.route, "task": ep.is_task, **ep.codec.describe(), **_bulk(ep)}
            for ep in service.endpoints
        ],
        # The same endpoints as BentoML's clients read them (docs/bentoml.md).
        "routes": bentoml_wire.routes(service),
    }


def _bulk(ep: Endpoint) -> dict[str, Any]:
    """Where a client finds the bulk routes of a task endpoint; their absence means an older server."""
    if not ep.is_task:
        return {}
    return {
        "bulk": {"submit_many": f"{ep.route}/submit_many", "wait_many": f"{ep.route}/wait_many", "max_ids": MAX_IDS}
    }


WAIT_MANY_DESCRIPTION = (
    "Long poll on many tasks of this route at once. Answers once at least min(min_done, len(task_ids)) of them "
    "have ended (or at once if an id is unknown), or after timeout seconds, with whatever has ended by then. "
    "tasks: the ended ones, in request order, each a TaskStatus plus, on success, either result (the JSON "
    f"result inline, up to {INLINE_RESULT} bytes each and {INLINE_BUDGET} bytes per answer) or result_url "
    "(GET it, as for files and images). pending: ids not ended yet. missing: ids unknown on this route "
    "(expired, never submitted, or of another route)."
)


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _call_params(limit: float) -> list[dict[str, Any]]:
    """A direct call's options: those of a submit, but a start no later than the call waits.

    ``run_at`` works too, within the same bound, but a time cannot carry that bound in a schema."""
    params = [p for p in OPTION_PARAMS if p["name"] != "run_at"]
    delay = next(p for p in params if p["name"] == "delay")
    schema = {**delay["schema"], "maximum": limit}
    described = f"{delay['description']} At most the call's time limit ({limit:g}s here)."
    return [{**delay, "schema": schema, "description": described} if p is delay else p for p in params]


def call_limit(ep: Endpoint, call_timeout: float) -> float:
    """Seconds a direct call of ``ep`` waits for its result: long enough for the task's own time limit."""
    return call_timeout if ep.timeout is None else max(call_timeout, ep.timeout + 30)


def openapi_document(service: Service, call_timeout: float = DEFAULT_CALL_TIMEOUT) -> dict[str, Any]:
    components = shared_components()
    paths: dict[str, Any] = {}
    for ep in service.endpoints:
        input_name = ep.codec.model.__name__
        components[input_name] = lift_defs(ep.codec.describe()["input"], components)
        ref = {"$ref": f"#/components/schemas/{input_name}"}
        multipart: dict[str, Any] = {"schema": ref}
        if encoding := multipart_encoding(ep):
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
                "parameters": _call_params(call_limit(ep, call_timeout)),
                "requestBody": body,
                "responses": {
                    "200": result_response(ep),
                    "422": invalid,
                    "409": _error(
                        CONFLICT + " Or the task failed by a limit the caller set (deadline, Cancel-After, ttl, "
                        "timeout): status and task_error say which."
                    ),
                    "429": FULL,
                    "413": _error("The body is larger than --max-body-size."),
                    "500": _error("The task failed (raised an error); task_error says how."),
                    "503": _error("Queue unavailable, or no worker is serving this route (the message says which)."),
                    "504": _error(
                        "The call did not finish within its time limit (the endpoint's timeout or --call-timeout)."
                    ),
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
                "parameters": OPTION_PARAMS,
                "requestBody": body,
                "responses": {
                    "200": {
                        **_json("Queued (or, with a known idempotency key, the earlier task).", SUBMITTED),
                        "headers": REPLAYED,
                    },
                    "422": invalid,
                    "409": _error(CONFLICT),
                    "429": FULL,
                    "413": _error("The body is larger than --max-body-size."),
                    "503": UNAVAILABLE,
                },
            }
        }
        paths[f"{ep.route}/submit_many"] = {
            "post": {
                "summary": f"Queue many {ep.name} tasks, all or none",
                "operationId": f"{ep.name}_submit_many",
                "tags": tag,
                "parameters": OPTION_PARAMS,
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
                    "409": _error(CONFLICT),
                    "429": FULL,
                    "503": UNAVAILABLE,
                },
            }
        }
        paths[f"{ep.route}/wait_many"] = {
            "post": {
                "summary": f"Wait for many {ep.name} tasks and fetch their results",
                "description": WAIT_MANY_DESCRIPTION,
                "operationId": f"{ep.name}_wait_many",
                "tags": tag,
                "requestBody": {"required": True, "content": {"application/json": {"schema": WAIT_MANY_REQUEST}}},
                "responses": {
                    "200": _json("The ended tasks, and the ids still pending or unknown.", WAIT_MANY_RESPONSE),
                    "413": _error("The body is larger than 1 MiB."),
                    "422": _error("An invalid body; detail names the field."),
                    "503": _error("Queue unavailable."),
                },
            }
        }
        paths[f"{ep.route}/status"] = {
            "get": {
                **by_id,
                "operationId": f"{ep.name}_status",
                "responses": {
                    "200": _json("The status.", STATUS),
                    "400": _error("No task_id."),
                    "404": not_found,
                    "503": UNAVAILABLE,
                },
            }
        }
        paths[f"{ep.route}/get"] = {
            "get": {
                **by_id,
                "operationId": f"{ep.name}_get",
                "responses": {
                    "200": result_response(ep),
                    "404": not_found,
                    "409": _error("Not successful (yet)."),
                    "503": UNAVAILABLE,
                },
            }
        }
        paths[f"{ep.route}/events"] = {
            "get": {
                "tags": tag,
                "summary": "The task's events as Server-Sent Events: status, progress and output, until its end",
                "operationId": f"{ep.name}_events",
                "parameters": [
                    TASK_ID_PARAM,
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "description": "Resume after this event id (S.O: status and output events seen).",
                        "schema": {"type": "string", "pattern": EVENT_ID_PATTERN},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "text/event-stream",
                        "content": {"text/event-stream": {"schema": SSE_EVENT}},
                    },
                    "400": _error("A Last-Event-ID this stream did not send."),
                    "404": not_found,
                    "503": UNAVAILABLE,
                },
            }
        }
        paths[f"{ep.route}/preview"] = {
            "get": {
                **by_id,
                "summary": "The latest preview image the task reported",
                "operationId": f"{ep.name}_preview",
                "responses": {
                    "200": {"description": "The image.", "content": {"image/jpeg": {}, "image/png": {}}},
                    "404": _error("No such task, or no preview yet."),
                    "503": UNAVAILABLE,
                },
            }
        }
        wait_timeout = {
            "type": "number",
            "minimum": 0,
            "default": 30,
            "description": f"Seconds to wait; more than {MAX_WAIT:g} waits {MAX_WAIT:g}.",
        }
        wait_params = [TASK_ID_PARAM, {"name": "timeout", "in": "query", "schema": wait_timeout}]
        paths[f"{ep.route}/wait"] = {
            "get": {
                "tags": tag,
                "parameters": wait_params,
                "operationId": f"{ep.name}_wait",
                "responses": {
                    "200": _json("The status, once terminal or at the timeout.", STATUS),
                    "404": not_found,
                    "503": UNAVAILABLE,
                },
            }
        }
        changes = {"type": "object", "properties": components[input_name].get("properties", {})}
        changes["additionalProperties"] = False
        overrides = {
            "required": False,
            "description": "Arguments to change, merged over the original ones and validated as a submit's.",
            "content": {"application/json": {"schema": changes}},
        }
        for action, summary in (
            ("retry", "Queue a new task with the same arguments (or some changed); it names this one in retry_of"),
            ("cancel", "Cancel the task"),
        ):
            op: dict[str, Any] = {
                **by_id,
                "summary": summary,
                "responses": {
                    "200": _json("Done.", SUBMITTED),
                    "404": not_found,
                    "409": _error("Not allowed in the task's state."),
                    "503": UNAVAILABLE,
                },
            }
            if action == "retry":
                op["requestBody"] = overrides
                op["responses"] = {**op["responses"], "422": invalid, "429": FULL}
            paths[f"{ep.route}/{action}"] = {
                "post": {**op, "operationId": f"{ep.name}_{action}"},
                "put": {**op, "operationId": f"{ep.name}_{action}_put"},
            }
    plain = {"200": {"description": "OK"}}
    for path in ("/schema.json", "/docs.json", "/healthz", "/metrics"):
        paths[path] = {"get": {"operationId": path.strip("/").replace(".", "_"), "responses": plain}}
    counts = {"type": "object", "additionalProperties": {"type": "integer"}, "description": "Ready workers per route."}
    ready_fields: dict[str, Any] = {"status": {"type": "string"}, "broker": {"type": "string"}, "workers": counts}
    ready = {"type": "object", "properties": ready_fields}
    short_dir = {"path": {"type": "string"}, "what": {"type": "string"}, "free_bytes": {"type": "integer"}}
    disk_short = {"type": "array", "items": {"type": "object", "properties": short_dir}}
    paths["/readyz"] = {
        "get": {
            "operationId": "readyz",
            "summary": "Ready when the broker answers and a live worker serves every route",
            "responses": {
                "200": _json("Ready; the worker count of each route.", ready),
                "503": _json(
                    "Not ready: the broker is away (error), a route has no worker (status no_workers), or "
                    "a directory the store writes to has less than --min-free-disk free (status disk_full; "
                    "disk lists each: path, what, free_bytes).",
                    {**ready, "properties": {**ready_fields, "error": {"type": "string"}, "disk": disk_short}},
                ),
            },
        }
    }
    paths["/tasks/{task_id}"] = {
        "get": {
            "operationId": "task_status",
            "summary": "The status of any task, whatever its route",
            "parameters": [{"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": _json("The task's status.", STATUS),
                "404": _error("No such task (or it was purged after its retention)."),
                "503": _error("Queue unavailable."),
            },
        }
    }
    paths["/tasks/{task_id}/arguments"] = {
        "get": {
            "operationId": "task_arguments",
            "summary": "The arguments a task was submitted with, as stored (files and images as base64)",
            "parameters": [{"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": _json("The validated arguments, one member per parameter.", {"type": "object"}),
                "404": _error("No such task (or it was purged after its retention)."),
                "503": _error("Queue unavailable."),
            },
        }
    }
    if not any(ui.is_public(ep.route) for ep in service.endpoints):  # else the dashboard is off, /ui an endpoint's
        paths["/ui"] = {
            "get": {
                "operationId": "dashboard",
                "summary": "The dashboard: queues, workers and tasks in a browser (its files are under /ui/)",
                "responses": {"200": {"description": "The dashboard's page.", "content": {"text/html": {}}}},
            }
        }
    paths["/workers"] = {
        "get": {
            "operationId": "workers",
            "summary": "The worker processes that report to the broker, from any host",
            "responses": {
                "200": _json(
                    "Live workers, each with its routes, state, running tasks and tallies.",
                    {"type": "object", "properties": {"workers": {"type": "array", "items": WORKER}}},
                ),
                "503": _error("Queue unavailable."),
            },
        }
    }
    paths.update(_operating_paths())
    _common_errors(paths)
    return {
        "openapi": "3.1.0",
        "info": {"title": service.name, "version": __version__, "description": DESCRIPTION},
        "paths": paths,
        "components": {"schemas": components},
    }


def _common_errors(paths: dict[str, Any]) -> None:
    """The answers any operation may give before its handler runs, or while it reads a body."""
    refused = _error("Refused before routing: a Host not in --allowed-host, or a task_id missing (?task_id=ID).")
    for item in paths.values():
        for op in item.values():
            responses = op["responses"]
            responses.setdefault("400", refused)
            if "requestBody" in op:
                responses.setdefault("408", _error("The body stopped arriving for --body-timeout seconds."))
                responses.setdefault("413", _error("The body is larger than --max-body-size."))
                responses.setdefault("415", _error(UNSUPPORTED))


def _operating_paths() -> dict[str, Any]:
    """``GET /tasks`` and ``GET /queues`` (SPEC §9)."""
    states = ["pending", "in_progress", "success", "failure", "cancelled"]
    params = [
        {"name": "route", "in": "query", "schema": {"type": "string"}, "description": "Only this route's tasks."},
        {"name": "status", "in": "query", "schema": {"type": "string", "enum": states}},
        {
            "name": "tag",
            "in": "query",
            "schema": TAG_SCHEMA,
            "description": "KEY:VALUE; only tasks so labelled.",
        },
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}},
        {
            "name": "cursor",
            "in": "query",
            "schema": {"type": "string", "pattern": "^([0-9a-f]{32})?$"},
            "description": "next_cursor of the page before (a task id); empty or absent: the first page.",
        },
    ]
    page = {
        "type": "object",
        "properties": {
            "tasks": {"type": "array", "items": STATUS},
            "next_cursor": {"type": ["string", "null"], "description": "Absent (null) at the end."},
        },
    }
    invalid = {"type": "object", "properties": {"error": {"type": "string"}, "parameter": {"type": "string"}}}
    count = {"type": "integer"}
    queue = {
        "type": "object",
        "properties": {
            "route": {"type": "string"},
            "name": {"type": "string"},
            "counts": {"type": "object", "properties": {s: count for s in states}},
            "oldest_pending_age": {
                "type": ["number", "null"],
                "description": "Seconds the longest-waiting due task has waited (null: none waits).",
            },
            "running": count,
            "workers": count,
            "concurrency": {"type": ["integer", "null"], "description": "The route's cap on tasks running at once."},
            "max_queue": {"type": ["integer", "null"], "description": "The most pending tasks the route accepts."},
            "finished_last_minute": count,
            "window": {"type": "number", "description": "Seconds finished_last_minute covers (60 once warm)."},
        },
    }
    return {
        "/tasks": {
            "get": {
                "operationId": "list_tasks",
                "summary": "Tasks of every route, newest first, a page at a time",
                "parameters": params,
                "responses": {
                    "200": _json("A page of task statuses and the cursor of the next.", page),
                    "422": _json("A bad parameter, named in parameter.", invalid),
                    "503": _error("Queue unavailable."),
                },
            }
        },
        "/queues": {
            "get": {
                "operationId": "queues",
                "summary": "Per route: counts by status, the longest wait, running, caps, finished in the last minute",
                "responses": {
                    "200": _json(
                        "One entry per task route.",
                        {"type": "object", "properties": {"queues": {"type": "array", "items": queue}}},
                    ),
                    "503": _error("Queue unavailable."),
                },
            }
        },
    }
