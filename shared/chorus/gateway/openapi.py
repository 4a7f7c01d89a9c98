"""The gateway's OpenAPI 3.1 document; its schemas are generated from the msgspec types."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from chorus import __version__
from chorus.gateway.approvals import ApprovalList, approval_paths
from chorus.gateway.bodies import ApiErrorBody, HealthReport, RunAccepted, RunList, TailLine
from chorus.gateway.run_control import SteerBody
from chorus.messages import (
    AgentRecord,
    Approval,
    ApprovalDecision,
    Metrics,
    RunRecord,
    RunRequest,
    StreamChunk,
)

REF: Final = "#/components/schemas/{name}"


def _ref(kind: type[Any]) -> dict[str, str]:
    return {"$ref": REF.format(name=kind.__name__)}


def _json(description: str, kind: type[Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(kind)}}}


def _error(description: str) -> dict[str, Any]:
    return _json(description, ApiErrorBody)


_NATS_DOWN: Final = _error("NATS is unreachable (code `nats_unreachable`)")
_RUN_ID: Final = {
    "name": "run_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$", "maxLength": 128},
}
_ACCEPTED_HEADERS: Final = {
    "Location": {"description": "where to read the run", "schema": {"type": "string"}}
}


def _paths() -> dict[str, Any]:
    return {**_run_paths(), **approval_paths(_json, _error, _NATS_DOWN, _ref)}


def _run_paths() -> dict[str, Any]:
    accepted = {**_json("the run is queued or still going", RunAccepted)}
    accepted["headers"] = _ACCEPTED_HEADERS
    return {
        "/api/execute": {
            "post": {
                "summary": "Run a workflow, given inline or by name",
                "description": "Waits for the run to finish (up to `timeout` seconds) unless "
                "`wait=false`. A finished run answers 200 whatever its status (completed, "
                "failed or cancelled); a run still going answers 202.",
                "parameters": [
                    {
                        "name": "wait",
                        "in": "query",
                        "schema": {"type": "boolean", "default": True},
                    },
                    {
                        "name": "timeout",
                        "in": "query",
                        "description": "seconds to wait for the result",
                        "schema": {"type": "number", "exclusiveMinimum": 0, "default": 300},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(RunRequest)}},
                },
                "responses": {
                    "200": _json("the finished run", RunRecord),
                    "202": accepted,
                    "400": _error("the request is invalid; the reason names the field"),
                    "404": _error("no workflow has that `workflow_name`"),
                    "413": _error("the body is larger than CHORUS_MAX_MESSAGE_BYTES"),
                    "503": _NATS_DOWN,
                },
            }
        },
        "/api/runs": {
            "get": {
                "summary": "The most recent runs first",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "default": 50},
                    }
                ],
                "responses": {"200": _json("runs", RunList), "503": _NATS_DOWN},
            }
        },
        "/api/runs/{run_id}": {
            "get": {
                "summary": "One run: status, steps, output",
                "parameters": [_RUN_ID],
                "responses": {
                    "200": _json("the run", RunRecord),
                    "404": _error("no such run"),
                    "503": _NATS_DOWN,
                },
            }
        },
        "/api/runs/{run_id}/cancel": {
            "post": {
                "summary": "Cancel a run",
                "description": "A pending run is cancelled at once; a running one is asked "
                "to stop, and its record says `cancelled` when it has.",
                "parameters": [_RUN_ID],
                "responses": {
                    "202": accepted,
                    "404": _error("no such run"),
                    "409": _error("the run has finished already"),
                    "503": _NATS_DOWN,
                },
            }
        },
        "/api/runs/{run_id}/stream": {
            "get": {
                "summary": "The run's live output, as Server-Sent Events",
                "description": "One event per StreamChunk of the run's tasks: `event` its kind "
                "(delta, tool_started, tool_finished, final, superseded), `data` the chunk as "
                "JSON, `id` its stream sequence. Reconnect with `Last-Event-ID` (or "
                "`?last_event_id=`) to get what follows it, with no gap and no duplicate. An "
                '`end` event (`{"run_id", "status"}`) follows the last chunk of a finished run.',
                "parameters": [
                    _RUN_ID,
                    {
                        "name": "task",
                        "in": "query",
                        "description": "one task only: a workflow step's name, or a task id",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "description": "the id of the last event received",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "the events, as they come",
                        "content": {"text/event-stream": {"schema": _ref(StreamChunk)}},
                    },
                    "400": _error("Last-Event-ID or task is not one this stream could take"),
                    "503": _NATS_DOWN,
                },
            }
        },
        "/api/tail/stream": {
            "get": {
                "summary": "Messages on the subjects, decoded like `chorus tail`",
                "description": "The gateway subscribes to the subjects an observer may follow "
                "(events, heartbeats, agent status, run progress and cancels, dead letters, "
                "live output; never the request subjects) that pass the filters, and sends "
                "each message as a `message` event whose data is a TailLine. A task's streamed "
                "deltas are gathered into lines. First an `open` event "
                '(`{"subject", "following"}`: the patterns subscribed to); a `dropped` event '
                '(`{"dropped": n}`) when a slow client lost messages. Nothing is stored: the '
                "stream starts now.",
                "parameters": [
                    {
                        "name": "subject",
                        "in": "query",
                        "description": "a NATS subject pattern (default: every subject)",
                        "schema": {"type": "string", "maxLength": 256},
                    },
                    {
                        "name": "kind",
                        "in": "query",
                        "description": "comma-separated kinds: event, heartbeat, status, "
                        "run_progress, run_cancel, dead_letter, stream_chunk (default: all)",
                        "schema": {"type": "string", "maxLength": 256},
                    },
                    {
                        "name": "run",
                        "in": "query",
                        "description": "only messages of this run id",
                        "schema": {"type": "string", "maxLength": 256},
                    },
                    {
                        "name": "agent",
                        "in": "query",
                        "description": "only messages from or about this agent or instance",
                        "schema": {"type": "string", "maxLength": 256},
                    },
                    {
                        "name": "heartbeats",
                        "in": "query",
                        "schema": {"type": "boolean", "default": True},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "the messages, as they come",
                        "content": {"text/event-stream": {"schema": _ref(TailLine)}},
                    },
                    "400": _error("a filter is not one the tail can take; the reason says which"),
                    "503": _NATS_DOWN,
                },
            }
        },
        "/api/health": {
            "get": {
                "summary": "NATS, the coordinator and the agents in the registry",
                "description": "`ok` when a coordinator answers and at least one agent is "
                "healthy, else `degraded`; 503 with status `unavailable` when NATS is away.",
                "responses": {
                    "200": _json("the system's health", HealthReport),
                    "503": _json("NATS is unreachable", HealthReport),
                },
            }
        },
        "/api/metrics": {
            "get": {
                "summary": "The coordinator's metrics",
                "responses": {
                    "200": _json("metrics", Metrics),
                    "503": _error("no coordinator answered, or NATS is unreachable"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text format 0.0.4)",
                "responses": {
                    "200": {
                        "description": "the exposition; `chorus_coordinator_up 0` and the "
                        "gateway's own counters when no coordinator answers",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


_AUTH_ERRORS: Final = {
    "401": _error("no API key, or an unknown one (code `unauthorized`)"),
    "403": _error("the key lacks the scope, or the Host or Origin is not allowed"),
}
_WRITE_ERRORS: Final = {"415": _error("the body is not `Content-Type: application/json`")}
_SECURITY_SCHEMES: Final = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key from `chorus gateway key add`; scopes read, execute, admin",
    }
}


def _control_paths() -> dict[str, Any]:
    """Routes of chorus.gateway.run_control: answer a human step, steer a run."""
    accepted = {**_json("taken; the run's status now", RunAccepted)}
    accepted["headers"] = _ACCEPTED_HEADERS
    return {
        "/api/runs/{run_id}/input": {
            "post": {
                "summary": "Answer the human step a waiting run is parked on",
                "description": "The body is the answer, any JSON, checked against the step's "
                "`schema`. The run then resumes on any orchestrator. A refused answer (400, "
                "code `invalid_answer`, the reason says where and what) leaves it waiting.",
                "parameters": [_RUN_ID],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
                "responses": {
                    "202": accepted,
                    "400": _error("the answer does not match the step's schema, or is not JSON"),
                    "404": _error("no such run"),
                    "409": _error("the run waits for no answer (code `not_waiting`)"),
                    "413": _error("the body is larger than CHORUS_MAX_MESSAGE_BYTES"),
                    "503": _NATS_DOWN,
                },
            }
        },
        "/api/runs/{run_id}/steer": {
            "post": {
                "summary": "Tell a run's agents something at their next model turn",
                "description": "`message` is added as a user message to the conversation of "
                "every task of the run, before its next model call.",
                "parameters": [_RUN_ID],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(SteerBody)}},
                },
                "responses": {
                    "202": accepted,
                    "400": _error("no `message`, or an empty one"),
                    "404": _error("no such run"),
                    "409": _error("the run has finished already"),
                    "413": _error("the body is larger than CHORUS_MAX_MESSAGE_BYTES"),
                    "503": _NATS_DOWN,
                },
            }
        },
    }


def _secured(paths: dict[str, Any]) -> dict[str, Any]:
    """Every route but health needs a key; writes take JSON only; waits are limited."""
    for path, operations in paths.items():
        for method, operation in operations.items():
            if path == "/api/health":
                operation["security"] = [{}, {"bearer": []}]  # open; agents only with `read`
                continue
            operation["responses"].update(_AUTH_ERRORS)
            if method == "post":
                operation["responses"].update(_WRITE_ERRORS)
    paths["/api/execute"]["post"]["responses"]["429"] = _error(
        "too many requests are waiting for runs; retry after `Retry-After` seconds"
    )
    return paths


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway's routes."""
    (_, schemas) = msgspec.json.schema_components(
        (
            RunRequest,
            RunRecord,
            RunAccepted,
            RunList,
            HealthReport,
            Metrics,
            AgentRecord,
            ApiErrorBody,
            StreamChunk,
            TailLine,
            Approval,
            ApprovalDecision,
            ApprovalList,
            SteerBody,
        ),
        ref_template=REF,
    )
    # A request decoded as one known type may leave its `type` tag out.
    request = schemas["RunRequest"]
    request["required"] = [f for f in request.get("required", []) if f != "type"]
    if not request["required"]:
        del request["required"]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Chorus gateway",
            "version": __version__,
            "description": "Run workflows on a Chorus system and watch its health over HTTP. "
            'Errors answer `{"error": {"code": ..., "reason": ...}}`.',
        },
        "paths": _secured({**_paths(), **_control_paths()}),
        "security": [{"bearer": []}],
        "components": {"schemas": schemas, "securitySchemes": _SECURITY_SCHEMES},
    }
