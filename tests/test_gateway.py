"""The HTTP gateway on a real uvicorn server and a real nats-server, through a real HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Receive, Scope, Send

from chorus.agent import Agent
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.gateway import create_app, listen, serve
from chorus.gateway.access import AccessLog
from chorus.gateway.options import GatewayOptions
from chorus.gateway.prometheus import SystemCollector
from chorus.messages import AgentMetrics, Metrics, RunRecord, decode
from chorus.nats.connection import connect, connect_options
from chorus.nats.server import NatsServer
from chorus.orchestrator.service import Orchestrator
from chorus.telemetry.metrics import GatewayInstruments, render
from tests.coordination import wait_for_metrics, wait_for_record
from tests.helpers import StartHost, child_env

PIPELINE = {
    "type": "pipeline",
    "name": "brief",
    "steps": [{"agent": "researcher", "instructions": "Find the facts."}],
}


@contextlib.asynccontextmanager
async def running(app: ASGIApp, stop: asyncio.Event) -> AsyncIterator[httpx.AsyncClient]:
    """`app` served by uvicorn on a free loopback port, and an HTTP client for it."""
    with listen("127.0.0.1", 0) as sock:
        server = asyncio.create_task(serve(app, sock, stop, grace=2))
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        try:
            async with httpx.AsyncClient(base_url=base, timeout=10, trust_env=False) as client:
                yield client
        finally:
            stop.set()
            await asyncio.wait_for(server, 10)


# These tests are about what the routes do; tests/test_gateway_security.py is about who may.
OPEN_ON_LOOPBACK = GatewayOptions.build("127.0.0.1", no_auth=True)


@contextlib.asynccontextmanager
async def running_gateway(
    nc: Client, settings: Settings, stop: asyncio.Event | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    stop = stop or asyncio.Event()
    app = create_app(nc, settings, OPEN_ON_LOOPBACK, stopping=stop)
    async with running(app, stop) as client:
        yield client


@pytest.fixture
async def http(nc: Client, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_gateway(nc, settings) as client:
        yield client


async def execute(http: httpx.AsyncClient, body: dict[str, Any], **params: str) -> httpx.Response:
    return await http.post("/api/execute", json=body, params=params)


# execute


async def test_execute_without_waiting_answers_202_with_where_to_follow_the_run(
    http: httpx.AsyncClient,
) -> None:
    response = await execute(http, {"workflow": PIPELINE, "input": "NATS"}, wait="false")

    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "pending"
    assert body["links"] == {"run": f"/api/runs/{body['run_id']}"}
    assert response.headers["location"] == body["links"]["run"]


async def test_a_submitted_run_can_be_read_back_with_its_workflow(http: httpx.AsyncClient) -> None:
    accepted = await execute(http, {"workflow": PIPELINE, "input": "NATS"}, wait="false")

    response = await http.get(accepted.headers["location"])

    assert response.status_code == 200
    run = decode(response.content, RunRecord)
    assert (run.status, run.input, run.workflow.name) == ("pending", "NATS", "brief")


async def test_an_invalid_workflow_is_a_400_naming_the_field(http: httpx.AsyncClient) -> None:
    workflow = {**PIPELINE, "steps": [{"instructions": "nobody does this"}]}

    response = await execute(http, {"workflow": workflow})

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_message"
    assert "$.workflow.steps[0]" in error["reason"]
    assert "`agent` or `capability`" in error["reason"]


async def test_a_body_that_is_not_json_is_a_400(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/api/execute", content=b"{not json", headers={"content-type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_message"


async def test_an_unknown_workflow_name_is_a_404(
    nc: Client, settings: Settings, tmp_path: Path
) -> None:
    with_folder = msgspec.structs.replace(settings, workflows=str(tmp_path))
    async with running_gateway(nc, with_folder) as http:
        response = await execute(http, {"workflow_name": "no-such-flow"})

    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "not_found"
    assert "no-such-flow" in error["reason"]


async def test_a_stored_workflow_runs_by_name(
    nc: Client, settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "summarise.yaml").write_text(
        "type: pipeline\nname: summarise\nsteps:\n  - capability: writing\n"
    )
    with_folder = msgspec.structs.replace(settings, workflows=str(tmp_path))
    async with running_gateway(nc, with_folder) as http:
        accepted = await execute(http, {"workflow_name": "summarise", "input": "x"}, wait="false")
        run = decode((await http.get(accepted.headers["location"])).content, RunRecord)

    assert run.workflow.name == "summarise"
    assert run.kind == "pipeline"


async def test_a_body_over_the_message_limit_is_a_413(
    http: httpx.AsyncClient, settings: Settings
) -> None:
    response = await execute(
        http, {"workflow": PIPELINE, "input": "x" * settings.max_message_bytes}
    )

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


async def test_a_bad_timeout_parameter_is_a_400_naming_it(http: httpx.AsyncClient) -> None:
    response = await execute(http, {"workflow": PIPELINE}, timeout="soon")

    assert response.status_code == 400
    assert "`timeout`" in response.json()["error"]["reason"]


@pytest.fixture
async def orchestrator(settings: Settings) -> AsyncIterator[Orchestrator]:
    client = await connect(settings, "orchestrator")
    service = Orchestrator(client, settings)
    await service.start()
    yield service
    await service.stop()
    await client.close()


async def test_execute_waits_and_answers_200_with_the_finished_run(
    http: httpx.AsyncClient,
    coordinator: Coordinator,
    orchestrator: Orchestrator,
    start_host: StartHost,
) -> None:
    await start_host(Agent(name="researcher", capabilities=["research"]))

    response = await execute(http, {"workflow": PIPELINE, "input": "NATS"}, timeout="20")

    assert response.status_code == 200, response.text
    run = decode(response.content, RunRecord)
    assert run.status == "completed", run.error
    assert run.output == "[offline] Find the facts.: NATS"
    assert [s.status for s in run.steps] == ["completed"]


async def test_a_run_not_finished_within_the_timeout_answers_202_with_its_status(
    http: httpx.AsyncClient,
) -> None:
    response = await execute(http, {"workflow": PIPELINE}, timeout="0.2")

    assert response.status_code == 202
    assert response.json()["status"] == "pending"
    assert response.headers["location"].startswith("/api/runs/")


async def test_a_waiting_request_answers_202_at_once_when_the_gateway_stops(
    nc: Client, settings: Settings
) -> None:
    stop = asyncio.Event()
    async with running_gateway(nc, settings, stop) as http:
        waiting = asyncio.create_task(execute(http, {"workflow": PIPELINE}))
        submitted = await nc.subscribe(settings.subjects.run_submit(), max_msgs=1)
        await submitted.next_msg(timeout=5)
        stop.set()

        response = await asyncio.wait_for(waiting, 5)

    assert response.status_code == 202
    assert response.json()["status"] == "pending"


class LogSeen(logging.Handler):
    """Sets `seen` when a `chorus.gateway` log record matches."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__()
        self.message, self.path = message, path
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == self.message and record.__dict__.get("path") == self.path:
            self.seen.set()


async def test_a_client_that_stops_waiting_does_not_hold_the_gateway(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    answered = LogSeen("request", "/api/execute")
    logger = logging.getLogger("chorus.gateway")
    logger.addHandler(answered)
    try:
        with caplog.at_level(logging.INFO, logger="chorus.gateway"):
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/api/execute", json={"workflow": PIPELINE}, timeout=0.3)

            # The default wait is 300 s: the request ends because the client went away.
            await asyncio.wait_for(answered.seen.wait(), 5)
    finally:
        logger.removeHandler(answered)


# runs


async def test_an_unknown_run_is_a_404(http: httpx.AsyncClient) -> None:
    response = await http.get("/api/runs/nosuchrun")

    assert response.status_code == 404
    assert response.json()["error"] == {"code": "not_found", "reason": "no run 'nosuchrun'"}


async def test_runs_are_listed_most_recent_first(http: httpx.AsyncClient) -> None:
    first = (await execute(http, {"workflow": PIPELINE, "input": "1"}, wait="false")).json()
    second = (await execute(http, {"workflow": PIPELINE, "input": "2"}, wait="false")).json()

    response = await http.get("/api/runs", params={"limit": "10"})

    assert response.status_code == 200
    runs = response.json()["runs"]
    assert [r["run_id"] for r in runs] == [second["run_id"], first["run_id"]]


async def test_cancelling_a_pending_run_cancels_it(http: httpx.AsyncClient) -> None:
    accepted = await execute(http, {"workflow": PIPELINE}, wait="false")
    link = accepted.headers["location"]

    response = await http.post(f"{link}/cancel")

    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    assert (await http.get(link)).json()["status"] == "cancelled"


async def test_cancelling_a_finished_run_is_a_409(http: httpx.AsyncClient) -> None:
    link = (await execute(http, {"workflow": PIPELINE}, wait="false")).headers["location"]
    await http.post(f"{link}/cancel")

    response = await http.post(f"{link}/cancel")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"


# health and metrics


def researcher() -> Agent:
    return Agent(name="researcher", capabilities=["research"], max_concurrency=3)


async def test_health_is_ok_with_a_coordinator_and_a_healthy_agent(
    http: httpx.AsyncClient,
    coordinator: Coordinator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    host = await start_host(researcher())
    await wait_for_record(nc, settings, host.instance, lambda r: r is not None)

    response = await http.get("/api/health")

    assert response.status_code == 200
    health = response.json()
    assert (health["status"], health["nats"], health["coordinator"]) == ("ok", "connected", "ok")
    assert health["healthy_agents"] == 1
    assert [a["instance"] for a in health["agents"]] == [host.instance]


async def test_health_is_degraded_without_a_coordinator(http: httpx.AsyncClient) -> None:
    response = await http.get("/api/health")

    assert response.status_code == 200
    health = response.json()
    assert (health["status"], health["coordinator"]) == ("degraded", "unreachable")
    assert health["healthy_agents"] == 0


async def test_api_metrics_are_the_coordinators_metrics(
    http: httpx.AsyncClient,
    coordinator: Coordinator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    host = await start_host(researcher())
    await wait_for_metrics(nc, settings, lambda m: m.healthy_agents == 1)

    response = await http.get("/api/metrics")

    assert response.status_code == 200
    metrics = response.json()
    assert (metrics["total_agents"], metrics["healthy_agents"]) == (1, 1)
    assert metrics["agents"][0]["instance"] == host.instance
    assert metrics["agents"][0]["max_concurrency"] == 3


async def test_api_metrics_are_a_503_without_a_coordinator(http: httpx.AsyncClient) -> None:
    response = await http.get("/api/metrics")

    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "no_responders"
    assert "chorus coordinator" in error["reason"]


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name, through the Prometheus client's own parser."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


async def test_prometheus_metrics_parse_and_have_a_series_per_agent(
    http: httpx.AsyncClient,
    coordinator: Coordinator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    host = await start_host(researcher())
    await wait_for_metrics(nc, settings, lambda m: m.healthy_agents == 1)
    await http.get("/api/runs/nosuchrun")

    response = await http.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_prometheus(response.text)
    assert samples["chorus_coordinator_up"] == [({}, 1.0)]
    assert samples["chorus_agents_healthy"] == [({}, 1.0)]
    labels = {"instance": host.instance, "agent": "researcher"}
    assert samples["chorus_agent_max_concurrency"] == [(labels, 3.0)]
    assert samples["chorus_agent_healthy"] == [(labels, 1.0)]
    assert "chorus_tasks_completed_total" in samples
    not_found = {"route": "/api/runs/{run_id}", "method": "GET", "status": "404"}
    assert (not_found, 1.0) in samples["chorus_http_requests_total"]


async def test_prometheus_metrics_without_a_coordinator_say_so_and_keep_the_gateways_own(
    http: httpx.AsyncClient,
) -> None:
    await http.get("/api/health")

    samples = parse_prometheus((await http.get("/metrics")).text)

    assert samples["chorus_coordinator_up"] == [({}, 0.0)]
    assert "chorus_agents" not in samples
    health = {"route": "/api/health", "method": "GET", "status": "200"}
    assert samples["chorus_http_requests_total"] == [(health, 1.0)]


def test_prometheus_label_values_are_escaped() -> None:
    awkward = 'a "quoted" \\ back\nslash'
    agent = AgentMetrics(
        instance="i-1",
        name=awkward,
        health="healthy",
        load=2,
        max_concurrency=4,
        success_rate=1.0,
        mean_latency_ms=1.5,
        breaker="closed",
    )
    metrics = Metrics(
        total_agents=1,
        healthy_agents=1,
        queue_length=0,
        active_jobs=0,
        total_tasks=0,
        completed_tasks=0,
        failed_tasks=0,
        retried_tasks=0,
        dead_lettered=0,
        current_load=0.5,
        agents=[agent],
    )
    text = render(SystemCollector(metrics)).decode()

    assert parse_prometheus(text)["chorus_agent_load"] == [
        ({"instance": "i-1", "agent": awkward}, 2.0)
    ]


# the document, errors, logs


async def test_openapi_describes_every_route_with_the_message_schemas(
    http: httpx.AsyncClient,
) -> None:
    response = await http.get("/openapi.json")

    assert response.status_code == 200
    document = json.loads(response.content)
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        "/api/execute",
        "/api/runs",
        "/api/runs/{run_id}",
        "/api/runs/{run_id}/cancel",
        "/api/runs/{run_id}/stream",
        "/api/tail/stream",
        "/api/runs/{run_id}/input",
        "/api/runs/{run_id}/steer",
        "/api/health",
        "/api/metrics",
        "/metrics",
        "/openapi.json",
        "/api/approvals",
        "/api/approvals/{approval_id}",
    }
    schemas = document["components"]["schemas"]
    assert {"RunRequest", "RunRecord", "Metrics", "AgentRecord", "Pipeline"} <= set(schemas)
    body = document["paths"]["/api/execute"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RunRequest"
    }


async def test_an_unknown_route_is_a_json_404(http: httpx.AsyncClient) -> None:
    response = await http.get("/api/nothing-here")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_a_wrong_method_is_a_json_405_saying_which_are_allowed(
    http: httpx.AsyncClient,
) -> None:
    response = await http.get("/api/execute")

    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"


async def test_an_unexpected_error_is_a_json_500_without_the_traceback() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("secret internals")

    async with running(AccessLog(broken, GatewayInstruments()), asyncio.Event()) as http:
        response = await http.get("/anything")

    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "secret" not in response.text


async def test_every_request_is_logged_with_its_route_and_status(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="chorus.gateway"):
        await http.get("/api/runs/nosuchrun")

    entry = next(r for r in caplog.records if r.name == "chorus.gateway" and r.msg == "request")
    assert entry.__dict__["route"] == "/api/runs/{run_id}"
    assert entry.__dict__["path"] == "/api/runs/nosuchrun"
    assert entry.__dict__["status"] == 404


# NATS away


@contextlib.asynccontextmanager
async def gateway_losing_nats(
    server: NatsServer, settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway on `server` (reconnecting forever, as the service does), which then stops."""
    settings = msgspec.structs.replace(settings, nats_url=server.url)
    lost = asyncio.Event()

    async def on_disconnect() -> None:
        lost.set()

    options = connect_options(settings, "gateway", service=True)
    client = await nats.connect(**{**options, "disconnected_cb": on_disconnect})
    try:
        async with running_gateway(client, settings) as http:
            assert (await http.get("/api/runs")).status_code == 200
            server.stop()
            await asyncio.wait_for(lost.wait(), 5)
            yield http
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/execute"),
        ("GET", "/api/runs"),
        ("GET", "/api/runs/some-run"),
        ("POST", "/api/runs/some-run/cancel"),
        ("GET", "/api/metrics"),
    ],
)
async def test_routes_that_need_nats_answer_503_at_once_while_it_is_down(
    own_nats_server: NatsServer, settings: Settings, method: str, path: str
) -> None:
    async with gateway_losing_nats(own_nats_server, settings) as http:
        body = {"workflow": PIPELINE} if method == "POST" else None

        response = await asyncio.wait_for(http.request(method, path, json=body), 2)

    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "nats_unreachable"
    assert "NATS_URL" in error["reason"]


async def test_health_is_503_unavailable_while_nats_is_down(
    own_nats_server: NatsServer, settings: Settings
) -> None:
    async with gateway_losing_nats(own_nats_server, settings) as http:
        response = await asyncio.wait_for(http.get("/api/health"), 2)
        scrape = await asyncio.wait_for(http.get("/metrics"), 2)

    assert response.status_code == 503
    assert (response.json()["status"], response.json()["nats"]) == ("unavailable", "reconnecting")
    assert parse_prometheus(scrape.text)["chorus_gateway_nats_connected"] == [({}, 0.0)]


# the service


@pytest.mark.slow
async def test_the_gateway_service_serves_and_stops_cleanly_on_sigterm(
    settings: Settings,
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chorus",
        "gateway",
        "--port",
        "0",
        "--no-auth",
        env=child_env(settings),
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        port = await asyncio.wait_for(listening_port(process.stderr), 20)
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            health = await client.get(f"http://127.0.0.1:{port}/api/health")
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert health.status_code == 200
    assert code == 0


async def listening_port(stderr: asyncio.StreamReader) -> int:
    """The port from the service's `gateway listening` log line (JSON lines on stderr)."""
    while line := await stderr.readline():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("msg") == "gateway listening":
                return int(entry["port"])
    raise AssertionError("the gateway exited before listening")
