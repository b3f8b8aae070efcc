"""The OpenAPI 3.0 document of the API, served at ``/api/openapi.json``.

Written by hand next to the routes (there are few), so it says exactly what the
handlers do, including every error status; the tests validate it and fuzz the
running server from it.
"""

from __future__ import annotations

from typing import Any

from .._types import RunStatus
from ._inputs import DEFAULT_LIMIT, MAX_LIMIT, MAX_NAME

__all__ = ["document"]

_STATUSES = [str(s) for s in RunStatus]
_ANY: dict[str, Any] = {"description": "any JSON value"}
_NAME = {"type": "string", "minLength": 1, "maxLength": MAX_NAME}
_TIME = {"type": "string", "format": "date-time", "nullable": True}
_TEXT = {"type": "string", "nullable": True}

_SUMMARY_FIELDS = (
    "run_id",
    "workflow",
    "status",
    "queue",
    "parent_id",
    "started_at",
    "ended_at",
    "result",
    "error",
    "error_type",
    "unserved",
)

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    },
    "Summary": {
        "type": "object",
        "required": list(_SUMMARY_FIELDS),
        "properties": {
            "run_id": {"type": "string"},
            "workflow": {"type": "string"},
            "status": {"type": "string", "enum": _STATUSES},
            "queue": {"type": "string"},
            "parent_id": _TEXT,
            "started_at": _TIME,
            "ended_at": _TIME,
            "result": _ANY,
            "error": _TEXT,
            "error_type": _TEXT,
            "unserved": {
                "type": "boolean",
                "description": "a PENDING run that no live worker serves (workflow and queue)",
            },
        },
    },
    "RunDetail": {
        "allOf": [
            {"$ref": "#/components/schemas/Summary"},
            {
                "type": "object",
                "required": ["kwargs", "children"],
                "properties": {
                    "kwargs": {"type": "object", "additionalProperties": True},
                    "children": {"type": "array", "items": {"type": "string"}},
                },
            },
        ]
    },
    "RunsPage": {
        "type": "object",
        "required": ["runs", "next_cursor"],
        "properties": {
            "runs": {"type": "array", "items": {"$ref": "#/components/schemas/Summary"}},
            "next_cursor": _TEXT,
        },
    },
    "Workflows": {
        "type": "object",
        "required": ["workflows"],
        "properties": {
            "workflows": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "counts"],
                    "properties": {
                        "name": {"type": "string"},
                        "counts": {
                            "type": "object",
                            "additionalProperties": {"type": "integer", "minimum": 0},
                        },
                    },
                },
            }
        },
    },
    "History": {
        "type": "object",
        "required": ["run_id", "entries", "next_cursor"],
        "properties": {
            "run_id": {"type": "string"},
            "next_cursor": {"type": "string", "nullable": True},
            "entries": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": [
                        "seq",
                        "kind",
                        "name",
                        "at",
                        "started_at",
                        "duration_ms",
                        "attempts",
                        "error",
                        "value",
                    ],
                    "properties": {
                        "seq": {"type": "integer", "nullable": True},
                        "kind": {"type": "string"},
                        "name": {"type": "string", "nullable": True},
                        "at": {"type": "string", "nullable": True},
                        "started_at": {"type": "string", "nullable": True},
                        "duration_ms": {"type": "number", "nullable": True},
                        "attempts": {"type": "integer", "nullable": True},
                        "error": {"type": "string", "nullable": True},
                        "value": {},
                    },
                },
            },
        },
    },
    "Logs": {
        "type": "object",
        "required": ["logs"],
        "properties": {
            "logs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["level", "message", "fields", "at"],
                    "properties": {
                        "level": {"type": "string"},
                        "message": {"type": "string"},
                        "fields": {"type": "object", "additionalProperties": True},
                        "at": {"type": "string", "format": "date-time"},
                    },
                },
            }
        },
    },
    "StartRequest": {
        "type": "object",
        "required": ["workflow"],
        "additionalProperties": False,
        "properties": {
            "workflow": _NAME,
            "kwargs": {"type": "object", "nullable": True, "additionalProperties": True},
            "run_id": {**_NAME, "nullable": True},
            "queue": {**_NAME, "default": "default"},
            "priority": {
                "type": "integer",
                "nullable": True,
                "minimum": -(2**31),
                "maximum": 2**31 - 1,
                "description": "lower first, on a queue that orders by priority",
            },
            "concurrency_key": {**_NAME, "nullable": True},
            "delay": {"type": "number", "minimum": 0, "nullable": True},
            "timeout": {"type": "number", "minimum": 0, "nullable": True},
        },
    },
    "RunId": {
        "type": "object",
        "required": ["run_id"],
        "properties": {"run_id": {"type": "string"}},
    },
    "Accepted": {
        "type": "object",
        "required": ["run_id"],
        "properties": {"run_id": {"type": "string"}, "event": {"type": "string"}},
    },
    "CancelRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"revert": {"type": "boolean", "default": False}},
    },
    "ForkRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["from_step"],
        "properties": {
            "from_step": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
            "run_id": {"type": "string"},
        },
    },
    "Workers": {
        "type": "object",
        "required": ["workers"],
        "properties": {
            "workers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": [
                        "worker_id",
                        "host",
                        "pid",
                        "queues",
                        "workflows",
                        "started_at",
                        "last_beat",
                    ],
                    "properties": {
                        "worker_id": {"type": "string"},
                        "host": {"type": "string"},
                        "pid": {"type": "integer"},
                        "queues": {"type": "array", "items": {"type": "string"}},
                        "workflows": {"type": "array", "items": {"type": "string"}},
                        "started_at": {"type": "string"},
                        "last_beat": {"type": "string"},
                    },
                },
            }
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    },
}

_WHY = {
    "400": "bad input: malformed JSON, a bad field, filter, limit or cursor",
    "401": "missing or wrong bearer token",
    "404": "no run has this id",
    "409": "the run already finished, or cannot be resumed in its status",
    "413": "the body or a value in it is over the conductor's max_payload_bytes",
    "501": "not supported yet",
    "503": "the store cannot be reached",
}


def _ref(schema: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{schema}"}


def _body(schema: dict[str, Any], *, required: bool) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _op(summary: str, ok: dict[str, Any], errors: str, **extra: Any) -> dict[str, Any]:
    responses = dict(ok)
    for code in errors.split():
        responses[code] = _json("Error", _WHY[code])
    return {"summary": summary, "responses": responses, **extra}


def _param(name: str, where: str, schema: dict[str, Any], text: str, **extra: Any) -> Any:
    return {"name": name, "in": where, "schema": schema, "description": text, **extra}


_RUN_ID = _param("run_id", "path", {"type": "string"}, "the run's id", required=True)
_LIST = [
    _param("workflow", "query", {"type": "string"}, "only runs of this workflow"),
    _param(
        "status",
        "query",
        {"type": "array", "items": {"type": "string", "enum": _STATUSES}},
        "only runs with one of these statuses (repeat the parameter)",
        style="form",
        explode=True,
    ),
    _param("filter", "query", {"type": "string"}, "the filter grammar as JSON"),
    _param(
        "limit",
        "query",
        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
        "runs per page",
    ),
    _param("cursor", "query", {"type": "string"}, "the next_cursor of the previous page"),
]
_LIMIT = _param(
    "limit",
    "query",
    {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
    "entries per page",
)
_HISTORY_CURSOR = _param(
    "cursor", "query", {"type": "string"}, "the next_cursor of the previous history page"
)
_BODY_ANY = {
    "required": False,
    "description": "the event's payload (no body: null)",
    "content": {"application/json": {"schema": {}}},
}


def _paths(secured: bool) -> dict[str, Any]:
    """Every route, in the order of the API's route table; ``secured`` adds the 401
    that a token makes possible to each ``/api`` operation."""
    auth = " 401" if secured else ""
    return {**_open_paths(), **_read_paths(auth), **_action_paths(auth)}


def _open_paths() -> dict[str, Any]:
    """The routes that never want a token (load balancers and scrapers)."""
    metrics_text = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "/healthz": {
            "get": {
                "summary": "200 while the store answers",
                "security": [],
                "responses": {
                    "200": _json("Health", "the store answers"),
                    "503": _json("Error", _WHY["503"]),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics of this process (text exposition)",
                "security": [],
                "responses": {
                    "200": {"description": "the metrics", "content": metrics_text},
                    "501": _json("Error", "prometheus-client is not installed"),
                },
            }
        },
    }


def _read_paths(auth: str) -> dict[str, Any]:
    """The document itself, the workflow counts, and the runs (listed, started, read)."""
    start = _op(
        "start a run (idempotent on run_id)",
        {
            "201": _json("RunId", "started"),
            "200": _json("RunId", "a run with this run_id exists; nothing changed"),
        },
        "400 413 503" + auth,
        requestBody=_body(_ref("StartRequest"), required=True),
    )
    return {
        "/api/openapi.json": {
            "get": _op("this document", {"200": {"description": "OpenAPI 3.0"}}, auth)
        },
        "/api/workflows": {
            "get": _op(
                "workflow names with run counts by status",
                {"200": _json("Workflows", "every registered or stored workflow")},
                "503" + auth,
            )
        },
        "/api/runs": {
            "get": _op(
                "run summaries, newest first, one page",
                {"200": _json("RunsPage", "a page of runs")},
                "400 503" + auth,
                parameters=_LIST,
            ),
            "post": start,
        },
        "/api/runs/{run_id}": _run_read(
            "the run's summary, kwargs and children", "RunDetail", "the run", auth
        ),
        "/api/runs/{run_id}/history": _run_read(
            "one page of the run's timeline: every durable call, event and the end",
            "History",
            "timeline entries in call order",
            auth,
            _LIMIT,
            _HISTORY_CURSOR,
        ),
        "/api/runs/{run_id}/logs": _run_read(
            "the run's log lines (and those of the runs it continued into)",
            "Logs",
            "log lines in order",
            auth,
        ),
    }


def _run_read(summary: str, schema: str, what: str, auth: str, *params: Any) -> dict[str, Any]:
    """A GET of one run's document: 200, or 400, 404, 503 (and 401 with a token)."""
    ok = {"200": _json(schema, what)}
    return {"get": _op(summary, ok, "400 404 503" + auth, parameters=[_RUN_ID, *params])}


def _action_paths(auth: str) -> dict[str, Any]:
    """What changes a run (events, cancel, resume, fork), and the worker registry."""
    event_name = _param("name", "path", {"type": "string"}, "the event's name", required=True)
    return {
        "/api/runs/{run_id}/events/{name}": {
            "post": _op(
                "send an event; once answered it is never lost",
                {"202": _json("Accepted", "delivered")},
                "400 404 409 413 503" + auth,
                parameters=[_RUN_ID, event_name],
                requestBody=_BODY_ANY,
            )
        },
        "/api/runs/{run_id}/cancel": {
            "post": _op(
                "ask for cancellation, with revert: compensations first (a finished run: no-op)",
                {"202": _json("Accepted", "cancellation requested")},
                "400 404 413 503" + auth,
                parameters=[_RUN_ID],
                requestBody=_body(_ref("CancelRequest"), required=False),
            )
        },
        "/api/runs/{run_id}/resume": {
            "post": _op(
                "replay a FAILED or CANCELLED run with the deployed code",
                {"202": _json("Accepted", "the run is PENDING again")},
                "400 404 409 413 503" + auth,
                parameters=[_RUN_ID],
                requestBody=_body({"type": "object"}, required=False),
            )
        },
        "/api/runs/{run_id}/fork": {
            "post": _op(
                "a new run whose log is this run's before durable call from_step",
                {"201": _json("RunId", "the new run")},
                "400 404 413 503" + auth,
                parameters=[_RUN_ID],
                requestBody=_body(_ref("ForkRequest"), required=True),
            )
        },
        "/api/workers": {
            "get": _op(
                "the live workers of the store",
                {"200": _json("Workers", "workers by id")},
                "503" + auth,
            )
        },
    }


def document(*, root_path: str = "", secured: bool = False) -> dict[str, Any]:
    """The document; ``root_path`` (where the app is mounted) becomes its server;
    ``secured``: the app wants a bearer token on every ``/api`` route."""
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "Substantial",
            "version": "1",
            "description": "Operate Substantial runs: list, start, inspect, send, cancel.",
        },
        "servers": [{"url": root_path or "/"}],
        "paths": _paths(secured),
        "components": {"schemas": _SCHEMAS},
    }
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
