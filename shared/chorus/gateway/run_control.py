"""Routes that act on a run while it goes: answer its human step, steer its agents.

`POST /api/runs/{id}/input`: the body is the answer (any JSON), checked against the step's
schema (400 naming what is wrong; the run keeps waiting; 409 when it waits for nothing).
`POST /api/runs/{id}/steer`: `{"message": "..."}`, a user message the run's agents see at
their next model turn. Both answer 202 with the run's status and where to follow it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec
from nats.aio.client import Client
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from chorus.client.runs import RunClient
from chorus.errors import InvalidMessage
from chorus.gateway.auth import Endpoint
from chorus.gateway.keys import Scope
from chorus.gateway.limits import check_depth, read_body, require_json
from chorus.gateway.system import require_connected
from chorus.messages import RunStatus

log = logging.getLogger("chorus.gateway")

MakeRoute = Callable[..., Route]
Accepted = Callable[[str, RunStatus], Response]
RunId = Callable[[Request], str]


class SteerBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`POST /api/runs/{id}/steer`."""

    message: str


class RunControlRoutes:
    def __init__(
        self,
        nc: Client,
        runs: RunClient,
        *,
        max_bytes: int,
        max_depth: int,
        run_id: RunId,
        accepted: Accepted,
    ) -> None:
        self.nc = nc
        self.runs = runs
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.run_id = run_id
        self.accepted = accepted

    async def _json(self, request: Request) -> bytes:
        require_json(request)
        body = await read_body(request, self.max_bytes)
        check_depth(body, self.max_depth)
        return body

    async def input(self, request: Request) -> Response:
        """`POST /api/runs/{run_id}/input`: answer the human step the run waits on."""
        run_id = self.run_id(request)
        body = await self._json(request)
        try:
            answer = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise InvalidMessage(f"the body is not JSON: {exc}; send the answer as JSON") from None
        require_connected(self.nc)
        taken = await self.runs.respond(run_id, answer, by="gateway")
        log.info("human step answered", extra={"run_id": run_id, "step": taken.step})
        return self.accepted(run_id, (await self.runs.get(run_id)).status)

    async def steer(self, request: Request) -> Response:
        """`POST /api/runs/{run_id}/steer`: a user message for the run's agents."""
        run_id = self.run_id(request)
        body = await self._json(request)
        try:
            steer = msgspec.json.decode(body, type=SteerBody)
        except msgspec.ValidationError as exc:
            raise InvalidMessage(f'{exc}; send {{"message": "..."}}') from None
        except msgspec.DecodeError as exc:
            raise InvalidMessage(f"the body is not JSON: {exc}") from None
        require_connected(self.nc)
        await self.runs.steer(run_id, steer.message)
        log.info("run steered", extra={"run_id": run_id})
        return self.accepted(run_id, (await self.runs.get(run_id)).status)

    def routes(self, route: Callable[[str, Endpoint, Scope | None], Route]) -> list[Route]:
        """Both need the `execute` scope: they change what a run does."""
        return [
            route("/api/runs/{run_id}/input", self.input, "execute"),
            route("/api/runs/{run_id}/steer", self.steer, "execute"),
        ]
