"""The HTTP gateway: run workflows, read runs, health and metrics, over one NATS connection.

`create_app` takes everything it needs (the connection, the settings, what the gateway accepts,
an event that says the process is stopping) and holds no global state, so tests start as many
gateways as they like. Every API route but `/api/health` needs an API key with its scope; the
web console's pages (chorus.gateway.console) are open, since they hold no data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from chorus.client.runs import RunClient
from chorus.config import Settings
from chorus.errors import (
    ConfigError,
    Conflict,
    InvalidMessage,
    NoResponders,
    NotFound,
    RequestTimeout,
)
from chorus.gateway.access import AccessLog
from chorus.gateway.approvals import ApprovalRoutes
from chorus.gateway.auth import Authenticator, Endpoint
from chorus.gateway.bodies import ApiError, HealthReport, RunAccepted, RunLinks, RunList
from chorus.gateway.console import ASSETS_PATH, PAGES, Console
from chorus.gateway.guard import HostGuard
from chorus.gateway.keys import Scope
from chorus.gateway.limits import (
    WaitSlots,
    check_depth,
    check_publishable,
    read_body,
    require_json,
)
from chorus.gateway.live import LiveOutput
from chorus.gateway.openapi import document
from chorus.gateway.options import GatewayOptions
from chorus.gateway.prometheus import CONTENT_TYPE, exposition
from chorus.gateway.responses import EXCEPTION_HANDLERS, JSONResponse
from chorus.gateway.run_control import RunControlRoutes
from chorus.gateway.system import (
    SystemView,
    connection_state,
    nats_unreachable,
    require_connected,
)
from chorus.gateway.tail import TailRoute
from chorus.messages import (
    Metrics,
    RunRecord,
    RunRequest,
    RunStatus,
    decode,
    encode,
)
from chorus.subjects import check_token
from chorus.telemetry.metrics import GatewayInstruments

log = logging.getLogger("chorus.gateway")

DEFAULT_WAIT_S: Final = 300.0
MAX_WAIT_S: Final = 3600.0
DEFAULT_LIST: Final = 50
MAX_LIST: Final = 1000
STATUS_TIMEOUT_S: Final = 1.0  # for the coordinator's metrics: a health check answers fast
_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})


def run_link(run_id: str) -> str:
    return f"/api/runs/{run_id}"


def accepted(run_id: str, status: RunStatus) -> JSONResponse:
    """202: the run is queued or still going; where to follow it."""
    link = run_link(run_id)
    body = RunAccepted(run_id=run_id, status=status, links=RunLinks(run=link))
    return JSONResponse(body, status_code=202, headers={"Location": link})


def _flag(request: Request, name: str, default: bool) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return default
    if value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise InvalidMessage(f"query parameter `{name}` must be true or false, not {value!r}")


def _number(request: Request, name: str, default: float, *, most: float) -> float:
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 < number <= most:
        raise InvalidMessage(
            f"query parameter `{name}` must be a number above 0 and at most {most:g}, not {value!r}"
        )
    return number


def _run_id(request: Request) -> str:
    run_id: str = request.path_params["run_id"]
    try:
        return check_token(run_id, "run id")
    except ConfigError:
        raise NotFound(
            f"no run {run_id!r}: run ids use only letters, digits, '-' and '_'"
        ) from None


async def _until_disconnected(request: Request) -> None:
    """Returns when the client has gone (after the body is read, the server says only that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Gateway:
    """The route handlers, over one NATS connection."""

    def __init__(
        self,
        nc: Client,
        settings: Settings,
        options: GatewayOptions,
        *,
        stopping: asyncio.Event,
        status_timeout: float,
        metrics: GatewayInstruments,
    ) -> None:
        self.nc = nc
        self.settings = settings
        self.options = options
        self.auth = Authenticator(options.keys)
        self.waiting = WaitSlots(options.max_waiting)
        self.stopping = stopping
        self.runs = RunClient(nc, settings.subjects, workflow_dirs=settings.workflow_dirs)
        self.live = LiveOutput(nc, settings, self.runs, stopping=stopping)
        self.tail = TailRoute(nc, settings, stopping=stopping)
        self.console = Console()
        self.system = SystemView(nc, settings.subjects, timeout=status_timeout)
        self.instruments = metrics
        self.openapi = document()
        self.approvals = ApprovalRoutes(nc, settings, self.auth)

    async def execute(self, request: Request) -> Response:
        """`POST /api/execute`: submit a run; 200 with it once finished, else 202."""
        require_json(request)
        wait = _flag(request, "wait", True)
        timeout = _number(request, "timeout", DEFAULT_WAIT_S, most=MAX_WAIT_S)
        run_request = await self._run_request(request)
        require_connected(self.nc)
        # A slot is taken before submitting, so a request refused with 429 leaves no run.
        with self.waiting.take() if wait else contextlib.nullcontext():
            record = await self.runs.submit(run_request)
            log.info(
                "run submitted",
                extra={"run_id": record.run_id, "workflow": record.workflow.name, "wait": wait},
            )
            if not wait or record.finished:
                return (
                    JSONResponse(record) if record.finished else accepted(record.run_id, "pending")
                )
            finished = await self._wait(request, record.run_id, timeout)
        if finished is not None:
            return JSONResponse(finished)
        current = await self.runs.get(record.run_id)
        return (
            JSONResponse(current) if current.finished else accepted(current.run_id, current.status)
        )

    async def _run_request(self, request: Request) -> RunRequest:
        """The body as a RunRequest, checked for depth before decoding and for size after."""
        body = await read_body(request, self.settings.max_message_bytes)
        check_depth(body, self.options.max_json_depth)
        run_request = decode(body, RunRequest)
        check_publishable(len(encode(run_request)), self.nc.max_payload)
        return run_request

    async def _wait(self, request: Request, run_id: str, timeout: float) -> RunRecord | None:
        """The finished run; None when it goes on past the timeout, the client left, or the
        gateway is stopping (the run carries on either way)."""
        waiting = asyncio.create_task(self.runs.wait(run_id, timeout))
        gone = asyncio.create_task(_until_disconnected(request))
        stopped = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait([waiting, gone, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiting, gone, stopped):
                task.cancel()
            outcome, _, _ = await asyncio.gather(waiting, gone, stopped, return_exceptions=True)
        if isinstance(outcome, RunRecord):
            return outcome
        if isinstance(outcome, RequestTimeout | asyncio.CancelledError):
            return None
        raise outcome  # NATS failed while waiting: answered as a 503

    async def get_run(self, request: Request) -> Response:
        """`GET /api/runs/{run_id}`."""
        run_id = _run_id(request)
        require_connected(self.nc)
        return JSONResponse(await self.runs.get(run_id))

    async def list_runs(self, request: Request) -> Response:
        """`GET /api/runs?limit=`: the most recent first."""
        limit = int(_number(request, "limit", DEFAULT_LIST, most=MAX_LIST))
        require_connected(self.nc)
        return JSONResponse(RunList(runs=await self.runs.list(limit)))

    async def cancel_run(self, request: Request) -> Response:
        """`POST /api/runs/{run_id}/cancel`: 202 with the status the run has now."""
        require_json(request, body=False)
        run_id = _run_id(request)
        require_connected(self.nc)
        record = await self.runs.get(run_id)
        if record.finished:
            raise Conflict(f"run {run_id} is {record.status} already; there is nothing to cancel")
        await self.runs.cancel(run_id)
        log.info("run cancel asked", extra={"run_id": run_id})
        # A pending run is cancelled at once; a running one when its orchestrator stops it.
        return accepted(run_id, (await self.runs.get(run_id)).status)

    async def health(self, request: Request) -> Response:
        """`GET /api/health`: 200 ok or degraded; 503 while NATS is away. Open to all (for
        container health checks); the agent list only for keys that may read."""
        may_read = self.auth.may(request, "read")
        if not self.nc.is_connected:
            unreachable = nats_unreachable(self.nc)
            report = HealthReport(
                status="unavailable",
                nats=connection_state(self.nc),
                coordinator="unknown",
                healthy_agents=0,
                agents=[],
                error=ApiError(code=unreachable.code, reason=unreachable.reason),
            )
            return JSONResponse(report, status_code=503)
        report = await self.system.health()
        return JSONResponse(report if may_read else msgspec.structs.replace(report, agents=[]))

    async def metrics(self, request: Request) -> Response:
        """`GET /api/metrics`: the coordinator's Metrics; 503 when none answers."""
        require_connected(self.nc)
        return JSONResponse(await self.system.metrics())

    async def prometheus(self, request: Request) -> Response:
        """`GET /metrics`, always 200: what the gateway knows by itself is worth scraping
        when the coordinator or NATS is away."""
        metrics: Metrics | None = None
        if self.nc.is_connected:
            try:
                metrics = await self.system.metrics()
            except (NoResponders, NatsError) as exc:
                log.debug("no coordinator metrics", extra={"error": str(exc)})
        connected = connection_state(self.nc) == "connected"
        text = exposition(self.instruments, metrics, nats_connected=connected)
        return Response(text, media_type=CONTENT_TYPE)

    async def openapi_json(self, request: Request) -> Response:
        """`GET /openapi.json`."""
        return JSONResponse(self.openapi)


def create_app(
    nc: Client,
    settings: Settings,
    options: GatewayOptions,
    *,
    stopping: asyncio.Event | None = None,
    status_timeout: float = STATUS_TIMEOUT_S,
    metrics: GatewayInstruments | None = None,
) -> Starlette:
    """The gateway's ASGI app. Set `stopping` on shutdown: requests waiting for a run then
    answer 202 at once instead of holding the server open. `metrics`: where its requests
    are counted (a registry of its own by default)."""
    gateway = Gateway(
        nc,
        settings,
        options,
        stopping=stopping or asyncio.Event(),
        status_timeout=status_timeout,
        metrics=metrics if metrics is not None else GatewayInstruments(),
    )

    def route(path: str, endpoint: Endpoint, scope: Scope | None, *, post: bool = False) -> Route:
        handler = endpoint if scope is None else gateway.auth.protect(endpoint, scope)
        return Route(path, handler, methods=["POST" if post else "GET"])

    control = RunControlRoutes(
        nc,
        gateway.runs,
        max_bytes=settings.max_message_bytes,
        max_depth=options.max_json_depth,
        run_id=_run_id,
        accepted=accepted,
    )
    routes = [
        *control.routes(lambda path, endpoint, scope: route(path, endpoint, scope, post=True)),
        route("/api/execute", gateway.execute, "execute", post=True),
        route("/api/runs", gateway.list_runs, "read"),
        route("/api/runs/{run_id}", gateway.get_run, "read"),
        route("/api/runs/{run_id}/cancel", gateway.cancel_run, "execute", post=True),
        route("/api/runs/{run_id}/stream", gateway.live.stream, "read"),  # Server-Sent Events
        route("/api/health", gateway.health, None),  # open, for health checks: see health()
        route("/api/metrics", gateway.metrics, "read"),
        route("/metrics", gateway.prometheus, "read"),
        route("/openapi.json", gateway.openapi_json, "read"),
        route("/api/tail/stream", gateway.tail.stream, "read"),  # Server-Sent Events
        # The console: pages and assets hold no data (every page reads the API with a key).
        *(route(page, gateway.console.page, None) for page in PAGES),
        route(ASSETS_PATH + "/{name}", gateway.console.asset, None),
        route("/api/approvals", gateway.approvals.listed, "read"),
        route("/api/approvals/{approval_id}", gateway.approvals.decide, "execute", post=True),
    ]
    return Starlette(
        routes=routes,
        middleware=[
            # Outermost first: every request is logged and counted, refused ones too.
            Middleware(AccessLog, metrics=gateway.instruments),
            Middleware(HostGuard, options.allowed_hosts, options.allowed_origins),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
    )
