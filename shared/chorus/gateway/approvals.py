"""`GET /api/approvals` and `POST /api/approvals/{id}`: tool calls waiting for a person.

A decision needs a key with the `execute` scope (or `admin`), or the scope the approval names
(`decide_scope`); it is taken exactly once: a second one is a 409, an unknown id a 404.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from nats.aio.client import Client
from starlette.requests import Request
from starlette.responses import Response

from chorus.client.approvals import ApprovalBook
from chorus.config import Settings
from chorus.errors import ConfigError, NotFound
from chorus.gateway.auth import Authenticator
from chorus.gateway.keys import SCOPES
from chorus.gateway.limits import check_depth, read_body, require_json
from chorus.gateway.responses import JSONResponse
from chorus.gateway.system import require_connected
from chorus.messages import Approval, ApprovalDecision, decode
from chorus.subjects import check_token


class ApprovalList(msgspec.Struct, frozen=True, kw_only=True):
    approvals: list[Approval]  # oldest first


class ApprovalRoutes:
    def __init__(self, nc: Client, settings: Settings, auth: Authenticator) -> None:
        self.nc = nc
        self.settings = settings
        self.auth = auth
        self.book = ApprovalBook(nc, settings.subjects)

    async def listed(self, request: Request) -> Response:
        """`GET /api/approvals[?all=true]`: the pending ones (all with `all=true`)."""
        every = request.query_params.get("all", "").lower() in ("true", "1", "yes")
        require_connected(self.nc)
        found = await self.book.listed(pending_only=not every)
        return JSONResponse(ApprovalList(approvals=found))

    async def decide(self, request: Request) -> Response:
        """`POST /api/approvals/{id}` with `{"decision": "approve"|"reject", "reason", "edit"}`."""
        require_json(request)
        approval_id: str = request.path_params["approval_id"]
        try:
            check_token(approval_id, "approval id")
        except ConfigError:
            raise NotFound(f"no approval {approval_id!r}: ids are letters and digits") from None
        body = await read_body(request, self.settings.max_message_bytes)
        check_depth(body, 32)
        decision = decode(body, ApprovalDecision)
        require_connected(self.nc)
        approval, _ = await self.book.get(approval_id)
        if approval.decide_scope in SCOPES:
            self.auth.check(request, approval.decide_scope)
        caller = getattr(request.state, "api_key", "") or "anonymous"
        decided = await self.book.decide(
            approval_id,
            approve=decision.decision == "approve",
            reason=decision.reason,
            edit=decision.edit,
            by=f"gateway:{caller}",
        )
        return JSONResponse(decided)


_ID: Final = {
    "name": "approval_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$", "maxLength": 128},
}


def approval_paths(json: Any, error: Any, nats_down: Any, ref: Any) -> dict[str, Any]:
    """The routes' OpenAPI paths (`json(description, type)`, `error(description)`, `ref(type)`
    from chorus.gateway.openapi)."""
    return {
        "/api/approvals": {
            "get": {
                "summary": "Tool calls waiting for a person's decision",
                "parameters": [
                    {"name": "all", "in": "query", "schema": {"type": "boolean", "default": False}}
                ],
                "responses": {"200": json("oldest first", ApprovalList), "503": nats_down},
            }
        },
        "/api/approvals/{approval_id}": {
            "post": {
                "summary": "Approve, reject or approve with edited arguments",
                "description": "Taken exactly once (compare-and-set); the parked task resumes "
                "on any instance of its agent. `edit` only where the tool allows it.",
                "parameters": [_ID],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref(ApprovalDecision)}},
                },
                "responses": {
                    "200": json("the decided approval", Approval),
                    "400": error("an invalid decision, or an edit the tool does not allow"),
                    "404": error("no such approval"),
                    "409": error("decided already"),
                    "503": nats_down,
                },
            }
        },
    }
