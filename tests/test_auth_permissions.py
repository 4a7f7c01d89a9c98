"""Generated NATS credentials: a real nats-server runs the config `chorus auth init` writes.

The permission matrix: every attack of the security probe is tried with each principal's own
credentials, seen denied (a permissions violation in nats-py's `error_cb`, and a JetStream API
call that gets no answer), and leaves every stream, bucket and consumer as it was. Then the
allowances: an agent with its credentials serves tasks, heartbeats, publishes its declared
events, consumes its events and reads and writes its own state; coordinator, orchestrator and
gateway run a durable task and a workflow with theirs, and the server logs no violation.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig

from chorus.agent import Agent, Context
from chorus.agent.host import AgentHost
from chorus.auth import AuthLayout, init_auth
from chorus.client import ChorusClient
from chorus.client.durable import TaskQueue
from chorus.client.runs import RunClient
from chorus.client.runstore import KvRunStore
from chorus.client.streams import ChunkReader
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.errors import NatsAuthRefused
from chorus.llm.offline import OfflineModel
from chorus.messages import Event, RunRequest, Task
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer
from chorus.nats.streams import (
    ensure_agents_bucket,
    ensure_chunk_stream,
    ensure_dead_letter_stream,
    ensure_dispatch_stream,
    ensure_events_stream,
    ensure_runs_stream,
    ensure_tasks_bucket,
)
from chorus.orchestrator.service import CONSUMER as ORCHESTRATOR_CONSUMER
from chorus.orchestrator.service import Orchestrator
from chorus.specs.agent import AgentSpec
from chorus.specs.workflow import Pipeline, Step
from chorus.state.bucket import StateBucket
from chorus.subjects import Subjects, dispatch_target

PREFIX = "chorus"
S = Subjects(PREFIX)
WRITER = AgentSpec(
    name="writer",
    capabilities=["writing"],
    subscribes=["findings.>"],
    publishes=["reports.ready"],
    state=["drafts"],
)
RESEARCHER = AgentSpec(name="researcher", capabilities=["research"], state=["notes"])
OTHER_INSTANCE = "writer-0123456789"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Deployment(msgspec.Struct):
    layout: AuthLayout
    server: NatsServer
    log: Path
    monitor_port: int

    def settings(self, principal: str) -> Settings:
        base = Settings(
            nats_url=self.server.url, prefix=PREFIX, heartbeat_interval=0.2, request_timeout=10
        )
        return self.layout.settings_for(principal, base)

    def violations(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if "Violation" in line]


async def _provision(settings: Settings) -> None:
    """What the operator (or the first coordinator) creates, plus something in each."""
    nc = await connect(settings, "provision")
    js = nc.jetstream()
    for ensure in (
        ensure_events_stream,
        ensure_dispatch_stream,
        ensure_dead_letter_stream,
        ensure_runs_stream,
    ):
        await ensure(js, S)
    await ensure_chunk_stream(js, S, 3600)
    await ensure_tasks_bucket(js, S)
    await ensure_agents_bucket(js, S)
    await KvRunStore.open(js, S)
    await StateBucket.ensure(nc, S)
    await js.add_consumer(
        S.runs_stream, ConsumerConfig(durable_name=S.runs_consumer, ack_policy=AckPolicy.EXPLICIT)
    )
    await js.publish(S.event("findings.seed"), b"{}")
    await js.publish(S.dead_letter("cap.x"), b"{}")
    await js.publish(S.state_subject("drafts.d1"), b'"writer draft"')
    await js.publish(S.state_subject("notes.n1"), b'"researcher note"')
    await nc.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("auth")
    port = _free_port()
    layout = init_auth(
        root / "conf", [WRITER, RESEARCHER], prefix=PREFIX, monitor=f"127.0.0.1:{port}"
    )
    log = root / "server.log"
    server = NatsServer(root / "js", config_file=str(layout.server_config), log_file=log).start()
    found = Deployment(layout=layout, server=server, log=log, monitor_port=port)
    asyncio.run(_provision(found.settings("operator")))
    yield found
    server.stop()


class Probe:
    """A connection as one principal that keeps every error the server sent it."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._arrived = asyncio.Event()
        self.nc: Client | None = None

    async def on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc))
        self._arrived.set()

    async def violation(self, fragment: str, timeout: float = 5.0) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for error in self.errors:
                if "permissions violation" in error.lower() and fragment.lower() in error.lower():
                    return error
            self._arrived.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"no violation for {fragment!r}; errors: {self.errors}")
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                continue


@pytest.fixture
async def probe_as(deployment: Deployment) -> AsyncIterator[Any]:
    opened: list[Client] = []

    async def open_as(principal: str) -> Probe:
        probe = Probe()
        env = deployment.layout.environment(principal)
        probe.nc = await nats.connect(
            deployment.server.url,
            nkeys_seed=env["NATS_NKEY_SEED"],
            inbox_prefix=env["NATS_INBOX_PREFIX"],
            error_cb=probe.on_error,
            max_reconnect_attempts=1,
        )
        opened.append(probe.nc)
        return probe

    yield open_as
    for nc in opened:
        await nc.close()


async def _snapshot(deployment: Deployment) -> dict[str, Any]:
    """Every stream's message count and last sequence, and the consumers that matter."""
    nc = await connect(deployment.settings("operator"), "snapshot")
    js = nc.jetstream()
    seen: dict[str, Any] = {}
    for info in await js.streams_info():
        seen[info.config.name] = (info.state.messages, info.state.last_seq)
    for stream in (S.runs_stream, S.events_stream):
        seen[f"consumers:{stream}"] = sorted(c.name for c in await js.consumers_info(stream))
    await nc.close()
    return seen


# The attacks: (principal, what, how, subject, queue-or-body)
AGENT = "agent-researcher"
SERVICES = ("coordinator", "orchestrator", "gateway", "observer")
API = "$JS.API"
ATTACKS: list[tuple[str, str, str, str, str]] = [
    (AGENT, "forge another agent's heartbeat", "pub", S.heartbeat(OTHER_INSTANCE), ""),
    (AGENT, "subscribe to everything", "sub", ">", ""),
    (AGENT, "read every reply", "sub", "_INBOX.>", ""),
    (AGENT, "serve another agent's instance", "sub", S.agent_task(OTHER_INSTANCE), ""),
    (AGENT, "serve another agent's name", "sub", S.named_task("writer"), S.named_queue("writer")),
    (
        AGENT,
        "join another capability's queue group",
        "sub",
        S.capability_task("writing"),
        S.capability_queue("writing"),
    ),
    (AGENT, "answer another capability's help", "sub", S.help("writing"), S.help_queue("writing")),
    (AGENT, "forge a reply", "pub", "_INBOX.coordinator.forged", ""),
    (
        AGENT,
        "publish to the dispatch queue",
        "pub",
        S.dispatch(dispatch_target(capability="x")),
        "",
    ),
    (AGENT, "publish to the runs queue", "pub", S.run_submit(), ""),
    (
        AGENT,
        "decide another agent's approval",
        "pub",
        S.kv_subject(S.approvals_bucket, S.approval_key("writer", "a1")),
        "",
    ),
    (AGENT, "send a resume task", "pub", S.dispatch(dispatch_target(agent="researcher")), ""),
    (AGENT, "cancel a run", "pub", S.run_cancel("r1"), ""),
    (AGENT, "write a task outcome", "pub", S.outcome("t1"), ""),
    (AGENT, "publish an undeclared event", "pub", S.event("findings.forged"), ""),
    (AGENT, "write another agent's state", "pub", S.state_subject("drafts.d1"), ""),
    (
        AGENT,
        "read another agent's state",
        "api",
        f"{API}.DIRECT.GET.{S.state_stream}.{S.state_subject('drafts.d1')}",
        "",
    ),
    (
        AGENT,
        "read any state by sequence",
        "api",
        f"{API}.DIRECT.GET.{S.state_stream}",
        '{"seq": 1}',
    ),
    (AGENT, "get any state message", "api", f"{API}.STREAM.MSG.GET.{S.state_stream}", '{"seq":1}'),
    (
        AGENT,
        "watch the whole state bucket",
        "api",
        f"{API}.CONSUMER.CREATE.{S.state_stream}",
        "{}",
    ),
    (
        AGENT,
        "take another agent's events",
        "api",
        f"{API}.CONSUMER.MSG.NEXT.{S.events_stream}.{S.event_consumer('writer')}",
        '{"batch": 1}',
    ),
    (
        AGENT,
        "delete another agent's event consumer",
        "api",
        f"{API}.CONSUMER.DELETE.{S.events_stream}.{S.event_consumer('writer')}",
        "",
    ),
    (AGENT, "touch a stream it does not own", "api", f"{API}.STREAM.INFO.{S.runs_stream}", ""),
    (AGENT, "create a stream", "api", f"{API}.STREAM.CREATE.SPY", '{"name": "SPY"}'),
    *[
        (who, what, "api", subject, "")
        for who in (AGENT, *SERVICES)
        for what, subject in (
            ("purge the events stream", f"{API}.STREAM.PURGE.{S.events_stream}"),
            ("delete the dead letters", f"{API}.STREAM.DELETE.{S.dead_letter_stream}"),
            ("delete the runs bucket", f"{API}.STREAM.DELETE.KV_{S.runs_bucket}"),
            (
                "delete the orchestrator's consumer",
                f"{API}.CONSUMER.DELETE.{S.runs_stream}.{S.runs_consumer}",
            ),
        )
    ],
    *[(who, "subscribe to everything", "sub", ">", "") for who in SERVICES],
    *[
        (who, "write a task outcome", "pub", S.outcome("t1"), "")
        for who in ("orchestrator", "gateway", "observer")
    ],
    *[
        (who, "publish to the dispatch queue", "pub", S.dispatch("cap.x"), "")
        for who in ("gateway", "observer")
    ],
    ("observer", "publish to the runs queue", "pub", S.run_submit(), ""),
    ("observer", "forge a heartbeat", "pub", S.heartbeat(OTHER_INSTANCE), ""),
    ("observer", "cancel a run", "pub", S.run_cancel("r1"), ""),
    (
        "observer",
        "join a capability's queue group",
        "sub",
        S.capability_task("writing"),
        S.capability_queue("writing"),
    ),
    ("gateway", "forge a heartbeat", "pub", S.heartbeat(OTHER_INSTANCE), ""),
    ("orchestrator", "forge a heartbeat", "pub", S.heartbeat(OTHER_INSTANCE), ""),
    ("coordinator", "publish to the runs queue", "pub", S.run_submit(), ""),
]


@pytest.mark.parametrize(
    ("principal", "what", "how", "subject", "extra"),
    ATTACKS,
    ids=[f"{a[0]}: {a[1]}" for a in ATTACKS],
)
async def test_attack_is_denied_and_changes_nothing(
    deployment: Deployment,
    probe_as: Any,
    principal: str,
    what: str,
    how: str,
    subject: str,
    extra: str,
) -> None:
    before = await _snapshot(deployment)
    probe: Probe = await probe_as(principal)
    assert probe.nc is not None
    if how == "sub":
        await probe.nc.subscribe(subject, queue=extra)
        await probe.nc.flush()
        await probe.violation(f'subscription to "{subject}"')
    elif how == "pub":
        await probe.nc.publish(subject, b'{"forged": true}')
        await probe.nc.flush()
        await probe.violation(f'publish to "{subject}"')
    else:
        with pytest.raises(NatsTimeout):  # the API never hears it, so nothing answers
            await probe.nc.request(subject, extra.encode(), timeout=0.5)
        await probe.violation(f'publish to "{subject}"')
    assert await _snapshot(deployment) == before


async def test_a_client_without_credentials_is_refused(deployment: Deployment) -> None:
    anonymous = Settings(nats_url=deployment.server.url, prefix=PREFIX)
    with pytest.raises(NatsAuthRefused):
        await connect(anonymous, "anonymous")


def test_monitoring_listens_on_loopback_only(deployment: Deployment) -> None:
    assert f"Starting http monitor on 127.0.0.1:{deployment.monitor_port}" in (
        deployment.log.read_text()
    )


def test_the_orchestrator_consumer_name_is_the_one_subjects_names() -> None:
    assert S.runs_consumer == ORCHESTRATOR_CONSUMER


def writer_agent() -> Agent:
    agent = Agent(spec=WRITER)

    @agent.on_task
    async def draft(task: Task, ctx: Context) -> str:
        state = await ctx.state()
        await state.put(f"drafts.{task.task_id}", {"text": task.input})
        stored = await state.get(f"drafts.{task.task_id}")
        assert stored is not None
        ctx.emit("reports.ready", {"task": task.task_id})
        return f"drafted {stored.value['text']}"

    @agent.on_event
    async def react(event: Event, ctx: Context) -> None:
        ctx.emit("reports.ready", {"after": event.topic})

    return agent


@pytest.fixture
async def operator(deployment: Deployment) -> AsyncIterator[Client]:
    nc = await connect(deployment.settings("operator"), "operator")
    yield nc
    await nc.close()


@pytest.fixture
async def writer(deployment: Deployment) -> AsyncIterator[AgentHost]:
    host = AgentHost(writer_agent(), deployment.settings("agent-writer"), model=OfflineModel())
    await host.start()
    yield host
    await host.stop(timeout=5)


async def test_an_agent_with_its_credentials_heartbeats_serves_and_uses_its_state_and_events(
    deployment: Deployment, operator: Client
) -> None:
    violations = len(deployment.violations())
    beat: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
    reports: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_beat(msg: Msg) -> None:
        if not beat.done():
            beat.set_result(msg)

    await operator.subscribe(S.agent_heartbeats("writer"), cb=on_beat)
    await operator.subscribe(S.event("reports.ready"), cb=reports.put)
    host = AgentHost(writer_agent(), deployment.settings("agent-writer"), model=OfflineModel())
    await host.start()
    try:
        assert (await asyncio.wait_for(beat, 5)).subject == S.heartbeat(host.instance)

        client = ChorusClient(operator, S, timeout=10)
        result = await client.run_task(Task(input="hello"), capability="writing")
        assert result.output == "drafted hello"
        assert (await asyncio.wait_for(reports.get(), 5)).subject == S.event("reports.ready")

        await client.publish_event(Event(topic="findings.fresh", source="operator"))
        reaction = await asyncio.wait_for(reports.get(), 10)
        assert b"findings.fresh" in reaction.data

        named = await client.run_task(Task(input="again"), agent="writer")
        assert named.output == "drafted again"
    finally:
        await host.stop(timeout=5)
    assert deployment.violations()[violations:] == []


async def test_services_with_their_credentials_run_a_durable_task_and_a_workflow(
    deployment: Deployment,
) -> None:
    violations = len(deployment.violations())
    settings = {p: deployment.settings(p) for p in ("coordinator", "orchestrator", "gateway")}
    connections = {p: await connect(s, p) for p, s in settings.items()}
    coordinator = Coordinator(connections["coordinator"], settings["coordinator"])
    orchestrator = Orchestrator(connections["orchestrator"], settings["orchestrator"])
    await coordinator.start()
    await orchestrator.start()
    host = AgentHost(writer_agent(), deployment.settings("agent-writer"), model=OfflineModel())
    await host.start()
    operator = await connect(deployment.settings("operator"), "operator")
    try:
        queue = TaskQueue(operator, S)
        task = Task(input="durable")
        await queue.submit(task, capability="writing")
        outcome = await queue.wait(task.task_id, timeout=20)
        assert outcome.result is not None and outcome.result.output == "drafted durable"

        runs = RunClient(connections["gateway"], S)
        workflow = Pipeline(name="one", steps=[Step(name="draft", agent="writer")])
        pending = await runs.submit(RunRequest(workflow=workflow, input="flow"))
        record = await runs.wait(pending.run_id, timeout=30)
        assert record.status == "completed", record.error
        assert record.output == "drafted flow"

        # The gateway reads the run's live output (GET /api/runs/{id}/stream).
        async with ChunkReader(connections["gateway"], S, pending.run_id) as live:
            chunk = await live.next(10)
            while chunk.kind != "final":
                chunk = await live.next(10)
            assert await live.caught_up()
        assert (chunk.task_id, chunk.text) == ("draft", "drafted flow")
    finally:
        await host.stop(timeout=5)
        await orchestrator.stop()
        await coordinator.stop()
        for nc in (*connections.values(), operator):
            await nc.close()
    assert deployment.violations()[violations:] == []


def test_deploy_example_is_what_auth_init_writes_for_the_example_agents(tmp_path: Path) -> None:
    from chorus.cli.auth import example_specs
    from chorus.specs.agent import load_spec

    layout = init_auth(tmp_path, [load_spec(spec) for spec in example_specs()])
    deploy = Path(__file__).parent.parent / "deploy" / "auth"

    def without_keys(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.strip().startswith("nkey: ")]

    assert without_keys(layout.auth_include.read_text()) == without_keys(
        (deploy / "nats-auth.conf").read_text()
    )
    assert layout.server_config.read_text() == (deploy / "nats-server.conf").read_text()


@pytest.mark.parametrize(
    ("fields", "wrong"),
    [({"publishes": ["bad topic"]}, "event topic"), ({"state": ["notes.>"]}, "state prefix")],
)
def test_spec_publishes_and_state_are_validated(fields: dict[str, Any], wrong: str) -> None:
    from chorus.errors import ConfigError

    with pytest.raises(ConfigError, match=wrong):
        AgentSpec(name="writer", **fields)


def test_an_instance_id_must_start_with_its_agent_name() -> None:
    from chorus.errors import ConfigError

    with pytest.raises(ConfigError, match="instance id"):
        AgentHost(writer_agent(), Settings(), model=OfflineModel(), instance="researcher-abc")
