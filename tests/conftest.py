"""Fixtures: a real nats-server, per-test settings, agents in-process and as processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.agent import Agent
from chorus.agent.host import AgentHost
from chorus.agent.loader import load_agent
from chorus.client import ChorusClient
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.llm.offline import OfflineModel
from chorus.messages import Heartbeat, decode
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer
from chorus.orchestrator.service import Orchestrator
from chorus.workflows.engine import Engine
from tests.fake_openai import FakeOpenAI
from tests.helpers import (
    AgentProcess,
    Reap,
    SpawnAgent,
    StartCoordinator,
    StartHost,
    StartOrchestrator,
    child_env,
)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One server for the session; tests are isolated by a subject prefix of their own."""
    server = NatsServer(tmp_path_factory.mktemp("jetstream")).start()
    yield server
    server.stop()


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """A local HTTP server speaking the OpenAI Responses and Chat Completions APIs."""
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def openai_environ(fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> FakeOpenAI:
    """The fake server as this process's OpenAI (OPENAI_API_KEY, OPENAI_BASE_URL), for
    agents whose spec says `model: openai:...`."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-shared")
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    return fake_openai


@pytest.fixture
def own_nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of this test's own, for tests that stop or kill it."""
    server = NatsServer(tmp_path / "jetstream").start()
    yield server
    server.stop()


@pytest.fixture
def settings(nats_server: NatsServer) -> Settings:
    return Settings(
        nats_url=nats_server.url,
        prefix=f"t{uuid.uuid4().hex[:8]}",
        heartbeat_interval=0.2,
        request_timeout=10,
    )


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    client = await connect(settings, "test")
    yield client
    await client.close()


@pytest.fixture
async def start_coordinator(settings: Settings) -> AsyncIterator[StartCoordinator]:
    """Coordinators in this process, each on its own connection, with test-speed timings."""
    running: list[tuple[Coordinator, Client]] = []

    async def start(**overrides: object) -> Coordinator:
        tuned = msgspec.structs.replace(
            settings,
            **{
                "unhealthy_after": 3,
                "dead_after": 5,
                "retry_backoff": 0.05,
                "breaker_failures": 3,
                "breaker_cooldown": 0.5,
                "claim_timeout": 3,
                **overrides,
            },
        )
        client = await connect(tuned, "coordinator")
        service = Coordinator(client, tuned)
        await service.start()
        running.append((service, client))
        return service

    yield start
    for service, client in running:
        await service.stop()
        await client.close()


@pytest.fixture
async def coordinator(start_coordinator: StartCoordinator) -> Coordinator:
    return await start_coordinator()


@pytest.fixture
def client(nc: Client, settings: Settings) -> ChorusClient:
    return ChorusClient(nc, settings.subjects, timeout=10)


@pytest.fixture
async def engine(client: ChorusClient) -> AsyncIterator[Engine]:
    """A workflow engine in this process on the NATS implementations (direct tasks)."""
    engine = await Engine.on_nats(client)
    yield engine
    await engine.shutdown()


@pytest.fixture
async def start_orchestrator(settings: Settings) -> AsyncIterator[StartOrchestrator]:
    """Orchestrators in this process, each on its own connection; claims lapse after 2 s."""
    running: list[tuple[Orchestrator, Client]] = []

    async def start(**kw: object) -> Orchestrator:
        tuned = msgspec.structs.replace(settings, claim_timeout=2)
        client = await connect(tuned, "orchestrator")
        service = Orchestrator(client, tuned, **kw)  # type: ignore[arg-type]
        await service.start()
        running.append((service, client))
        return service

    yield start
    for service, client in running:
        await service.stop()
        await client.close()


@pytest.fixture
async def start_host(settings: Settings) -> AsyncIterator[StartHost]:
    """Start an agent instance in this process; all are drained at the end of the test."""
    hosts: list[AgentHost] = []

    async def start(agent: Agent, *, model: OfflineModel | None = None, **kw: object) -> AgentHost:
        host = AgentHost(agent, kw.pop("settings", settings), model=model or OfflineModel(), **kw)  # type: ignore[arg-type]
        await host.start()
        hosts.append(host)
        return host

    yield start
    for host in hosts:
        await host.stop(timeout=5)


@pytest.fixture
async def spawn_agent(settings: Settings, nc: Client, tmp_path: Path) -> AsyncIterator[SpawnAgent]:
    """Start an agent process and wait for its first heartbeat (it is then serving)."""
    processes: list[AgentProcess] = []

    async def spawn(
        spec: str | Path, *, ready_timeout: float = 20, env: dict[str, str] | None = None
    ) -> AgentProcess:
        """`env`: more environment for the child (an API key, CHORUS_LIMITS...)."""
        name = load_agent(str(spec)).name
        instance = f"{name}-p{len(processes)}{uuid.uuid4().hex[:6]}"
        ready = asyncio.Event()

        async def on_heartbeat(msg: Msg) -> None:
            if decode(msg.data, Heartbeat).state == "ready":
                ready.set()

        sub = await nc.subscribe(settings.subjects.heartbeat(instance), cb=on_heartbeat)
        log = tmp_path / f"{instance}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "chorus", "agent", "run", str(spec), "--instance", instance],
                env={**child_env(settings), **(env or {})},
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        child = AgentProcess(process, instance, log)
        processes.append(child)
        try:
            await asyncio.wait_for(ready.wait(), ready_timeout)
        except TimeoutError:
            raise AssertionError(f"agent {spec} not ready:\n{child.output()}") from None
        finally:
            await sub.unsubscribe()
        return child

    yield spawn
    for child in processes:
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()


@pytest.fixture
def reap() -> Iterator[Reap]:
    """Register child processes; any still running when the test ends is killed."""
    children: list[subprocess.Popen[bytes]] = []

    def register(process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        children.append(process)
        return process

    yield register
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait()
