"""Metrics and service discovery: the gateway's /metrics after a durable task (histograms and
token counters, read with prometheus_client's own parser), an agent process's own /metrics
on CHORUS_METRICS_PORT, and `$SRV.PING` answered by the coordinator, the orchestrator and
the gateway as well as the agents."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path

import httpx
import pytest
import yaml
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from prometheus_client.parser import text_string_to_metric_families

from chorus.agent import Agent
from chorus.client import ChorusClient, TaskQueue
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.gateway import create_app
from chorus.gateway.options import GatewayOptions
from chorus.gateway.process import register_service
from chorus.messages import Task
from chorus.nats import wire
from tests.helpers import SpawnAgent, StartHost, StartOrchestrator, write_spec

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Samples by name, and each family's type, through the Prometheus client's parser."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    found = [v for have, v in samples.get(name, []) if labels.items() <= have.items()]
    assert len(found) == 1, f"{name}{labels}: {samples.get(name)}"
    return found[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_gateway_metrics_show_dispatch_histograms_and_token_counters_after_a_task(
    coordinator: Coordinator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    await start_host(Agent(name="researcher", capabilities=["research"]))
    result = await TaskQueue(nc, settings.subjects).run(
        Task(input="What is a neap tide?"), agent="researcher", timeout=20
    )
    app = create_app(nc, settings, GatewayOptions.build("127.0.0.1", no_auth=True))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        await http.get("/api/health")
        response = await http.get("/metrics")

    assert response.status_code == 200
    samples, types = parse(response.text)
    target = {"target": "agent.researcher"}
    assert types["chorus_queue_wait_seconds"] == "histogram"
    assert value(samples, "chorus_queue_wait_seconds_count", **target) == 1
    assert types["chorus_dispatch_duration_seconds"] == "histogram"
    done = {**target, "outcome": "completed"}
    assert value(samples, "chorus_dispatch_duration_seconds_count", **done) == 1
    assert value(samples, "chorus_dispatch_duration_seconds_bucket", **done, le="+Inf") == 1
    tokens = {"agent": "researcher", "model": "offline"}
    assert result.usage.input_tokens > 0
    assert value(samples, "chorus_task_tokens_total", **tokens, type="input") == (
        result.usage.input_tokens
    )
    assert value(samples, "chorus_task_tokens_total", **tokens, type="output") == (
        result.usage.output_tokens
    )
    health = {"route": "/api/health", "method": "GET"}
    assert value(samples, "chorus_http_request_duration_seconds_count", **health) == 1
    assert value(samples, "chorus_tasks_completed_total") == 1  # the gauges as before


async def test_an_agent_started_with_a_metrics_port_serves_its_own_metrics(
    spawn_agent: SpawnAgent,
    client: ChorusClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    monkeypatch.setenv("CHORUS_METRICS_PORT", str(port))
    await spawn_agent(write_spec(tmp_path, "echo", "name: echo\nmodel: offline\n"))

    result = await client.run_task(Task(input="count my tokens"), agent="echo")
    async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics")

    assert response.status_code == 200
    samples, types = parse(response.text)
    model = {"agent": "echo", "model": "offline"}
    assert value(samples, "chorus_model_tokens_total", **model, type="input") == (
        result.usage.input_tokens
    )
    assert types["chorus_model_duration_seconds"] == "histogram"
    assert value(samples, "chorus_model_duration_seconds_count", **model, outcome="ok") == 1
    ok = {"agent": "echo", "outcome": "ok"}
    assert value(samples, "chorus_agent_handle_duration_seconds_count", **ok) == 1
    assert value(samples, "chorus_agent_in_flight") == 0


async def ping_all(nc: Client, wanted: set[str], timeout: float = 5.0) -> set[str]:
    """Scatter-gather `$SRV.PING`: the names of the services that answered, until all of
    `wanted` have or the timeout passes."""
    inbox = nc.new_inbox()
    names: set[str] = set()
    sub = await nc.subscribe(inbox)
    try:
        await wire.publish(nc, "$SRV.PING", b"", reply=inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not wanted <= names and (left := deadline - loop.time()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except NatsTimeout:
                break
            names.add(json.loads(msg.data)["name"])
    finally:
        await sub.unsubscribe()
    return names


async def test_srv_ping_finds_the_coordinator_orchestrator_and_gateway(
    coordinator: Coordinator,
    start_orchestrator: StartOrchestrator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    await start_orchestrator()
    await start_host(Agent(name="researcher"))
    gateway = await register_service(nc, settings.subjects, port=8080)
    subjects = settings.subjects
    roles = {subjects.role_service(r) for r in ("coordinator", "orchestrator", "gateway")}
    try:
        names = await ping_all(nc, roles | {subjects.micro_service})
    finally:
        await gateway.stop()

    assert roles | {subjects.micro_service} <= names


ROOT = Path(__file__).resolve().parent.parent


def exported_names() -> set[str]:
    """Every sample name the services' instrument sets can expose."""
    from chorus.telemetry.metrics import (
        AgentInstruments,
        DispatchInstruments,
        GatewayInstruments,
        RunInstruments,
    )

    suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",)}
    names = set()
    for kind in (AgentInstruments, DispatchInstruments, RunInstruments, GatewayInstruments):
        for family in kind().registry.collect():
            names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def test_every_metric_the_grafana_dashboard_queries_is_one_chorus_exports() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/chorus.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"chorus_\w+", target["expr"])
    }

    assert len(queried) >= 10
    assert queried <= exported_names(), queried - exported_names()


def test_prometheus_scrapes_each_compose_service_on_the_metrics_port() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    services = compose["services"]
    chorus = {name for name, service in services.items() if "build" in service}
    scraped: set[str] = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            scraped |= {t.removesuffix(":9464") for t in static["targets"] if t.endswith(":9464")}
        for dns in job.get("dns_sd_configs", []):
            assert dns["port"] == 9464
            scraped |= set(dns["names"])
    long_running = {name for name in chorus if "profiles" not in services[name]}

    assert scraped == long_running
    assert all(
        services[name].get("profiles") == ["observability"] for name in ("prometheus", "grafana")
    )
