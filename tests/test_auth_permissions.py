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
from chorus.client.dead_letters import DeadLetters
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
    ensure_effects_bucket,
    ensure_events_stream,
    ensure_runs_stream,
    ensure_sessions_bucket,
    ensure_tasks_bucket,
)
from chorus.orchestrator.service import CONSUMER as ORCHESTRATOR_CONSUMER
from chorus.orchestrator.service import Orchestrator
from chorus.specs.agent import AgentSpec, SessionSpec
from chorus.specs.tools import ToolSpec
from chorus.specs.workflow import Pipeline, Step
from chorus.state.bucket import StateBucket
from chorus.subjects import Subjects, dispatch_target
from chorus.tools.base import ToolCallContext, ToolDefinition
from chorus.tools.ledger import EffectLedger
from chorus.tools.peers import PeerTool, PeerToolSpec

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
# Calls the writer as a durable peer tool; keeps conversation sessions.
CALLER = AgentSpec(name="caller", capabilities=["calling"], tools=[ToolSpec(capability="writing")])
CHATTY = AgentSpec(name="chatty", capabilities=["chat"], session=SessionSpec())
# Keeps sessions too: may use its own, never chatty's.
GOSSIP = AgentSpec(name="gossip", capabilities=["gossip"], session=SessionSpec())
CHATTY_SESSION = S.session_subject(S.session_key("chatty", "conv0"))
CHATTY_TICKETS = S.session_subject(S.session_turns_key("chatty", "conv0"))
WRITER_EFFECT = S.kv_subject(S.effects_bucket, "writer.order1.charge.abc.1")
WRITER_EFFECTS = S.kv_subject(S.effects_bucket, "writer.>")
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
    await ensure_sessions_bucket(js, S, 3600)
    await ensure_effects_bucket(js, S)
    await js.add_consumer(
        S.runs_stream, ConsumerConfig(durable_name=S.runs_consumer, ack_policy=AckPolicy.EXPLICIT)
    )
    await js.publish(S.event("findings.seed"), b"{}")
    await js.publish(S.dead_letter("cap.x"), b"{}")
    await js.publish(S.state_subject("drafts.d1"), b'"writer draft"')
    await js.publish(S.state_subject("notes.n1"), b'"researcher note"')
    await js.publish(WRITER_EFFECT, b'{"secret": "writer effect"}')
    await js.publish(CHATTY_SESSION, b'{"session_id": "conv0", "items": ["chatty secret"]}')
    await nc.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("auth")
    port = _free_port()
    layout = init_auth(
        root / "conf",
        [WRITER, RESEARCHER, CALLER, CHATTY, GOSSIP],
        prefix=PREFIX,
        monitor=f"127.0.0.1:{port}",
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
    for stream in (S.runs_stream, S.events_stream, S.sessions_stream):
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
    # the effect ledger: its own records only (keys `<agent>.`)
    (AGENT, "write another agent's effect record", "pub", WRITER_EFFECT, ""),
    (
        AGENT,
        "read another agent's effect record",
        "api",
        f"{API}.DIRECT.GET.KV_{S.effects_bucket}.{WRITER_EFFECT}",
        "",
    ),
    (
        AGENT,
        "snapshot another agent's effect records",
        "api",
        f"{API}.CONSUMER.CREATE.KV_{S.effects_bucket}.spy.{WRITER_EFFECTS}",
        "{}",
    ),
    (
        AGENT,
        "read an effect record by sequence",
        "api",
        f"{API}.STREAM.MSG.GET.KV_{S.effects_bucket}",
        '{"seq": 1}',
    ),
    # durable peer calls and sessions: only for agents whose spec has them
    (AGENT, "read a task outcome", "api", f"{API}.STREAM.MSG.GET.{S.tasks_stream}", '{"seq":1}'),
    (AGENT, "follow the task outcomes", "api", f"{API}.CONSUMER.CREATE.{S.tasks_stream}", "{}"),
    (AGENT, "write a session", "pub", S.session_subject(S.session_key("researcher", "s1")), ""),
    (AGENT, "watch the sessions", "api", f"{API}.CONSUMER.CREATE.{S.sessions_stream}", "{}"),
    (AGENT, "interrupt a session's turn", "pub", S.session_interrupt("researcher", "s1"), ""),
    # an agent with `session:` and another agent's sessions
    *[
        ("agent-gossip", what, how, subject, extra)
        for what, how, subject, extra in (
            ("write another agent's session", "pub", CHATTY_SESSION, ""),
            (
                "write a turn ticket of another agent's session",
                "pub",
                S.session_subject(S.session_turn_key("chatty", "conv0", "t1")),
                "",
            ),
            (
                "direct-get another agent's session",
                "api",
                f"{API}.DIRECT.GET.{S.sessions_stream}.{CHATTY_SESSION}",
                "",
            ),
            (
                "read another agent's session by subject in the body",
                "api",
                f"{API}.DIRECT.GET.{S.sessions_stream}",
                msgspec.json.encode({"last_by_subj": CHATTY_SESSION}).decode(),
            ),
            (
                "get another agent's session by sequence",
                "api",
                f"{API}.STREAM.MSG.GET.{S.sessions_stream}",
                '{"seq": 1}',
            ),
            (
                "watch another agent's turn tickets",
                "api",
                f"{API}.CONSUMER.CREATE.{S.sessions_stream}.spy.{CHATTY_TICKETS}",
                "{}",
            ),
            (
                "watch every session through a filter in the body",
                "api",
                f"{API}.CONSUMER.CREATE.{S.sessions_stream}",
                "{}",
            ),
            (
                "interrupt another agent's session",
                "pub",
                S.session_interrupt("chatty", "conv0"),
                "",
            ),
            ("hear another agent's interrupts", "sub", S.session_interrupts("chatty"), ""),
            ("hear another agent's session writes", "sub", CHATTY_SESSION, ""),
        )
    ],
    (
        "agent-caller",
        "dispatch to a peer its spec does not name",
        "pub",
        S.dispatch(dispatch_target(capability="research")),
        "",
    ),
    ("agent-caller", "write a task outcome", "pub", S.outcome("t1"), ""),
    ("agent-chatty", "write another bucket's key", "pub", S.outcome("t1"), ""),
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


class Charge:
    """A side effect that counts how often it really ran."""

    definition = ToolDefinition(name="charge", side_effect=True)

    def __init__(self) -> None:
        self.runs = 0

    async def call(self, arguments: dict[str, Any], ctx: ToolCallContext) -> Any:
        self.runs += 1
        return {"receipt": f"r{self.runs}"}


@pytest.fixture
async def coordinator(deployment: Deployment) -> AsyncIterator[Coordinator]:
    settings = deployment.settings("coordinator")
    nc = await connect(settings, "coordinator")
    running = Coordinator(nc, settings)
    await running.start()
    yield running
    await running.stop()
    await nc.close()


async def test_an_agent_makes_a_durable_peer_call_and_gets_its_answer(
    deployment: Deployment, operator: Client, coordinator: Coordinator
) -> None:
    violations = len(deployment.violations())
    caller = Agent(spec=CALLER)

    @caller.on_task
    async def call_the_writer(task: Task, ctx: Context) -> str:
        # The peer tool of the spec's `tools: [{capability: writing}]`, as the loop calls it.
        tool = PeerTool(PeerToolSpec(capability="writing", timeout_s=30))
        call = ToolCallContext(
            agent=ctx.agent_name,
            instance=ctx.instance,
            task_id=task.task_id,
            client=ctx.client,
            queue=ctx.queue,
        )
        answer = await tool.call({"input": task.input}, call)
        return f"the writer {answer.instance} said: {answer.output}"

    hosts = [
        AgentHost(writer_agent(), deployment.settings("agent-writer"), model=OfflineModel()),
        AgentHost(caller, deployment.settings("agent-caller"), model=OfflineModel()),
    ]
    for host in hosts:
        await host.start()
    try:
        client = ChorusClient(operator, S, timeout=30)
        result = await client.run_task(Task(input="peer"), capability="calling")
    finally:
        for host in hosts:
            await host.stop(timeout=5)
    assert result.output == f"the writer {hosts[0].instance} said: drafted peer"
    assert deployment.violations()[violations:] == []


async def test_an_agent_continues_a_session_under_its_credentials(
    deployment: Deployment, operator: Client, coordinator: Coordinator
) -> None:
    violations = len(deployment.violations())
    chatty = Agent(spec=CHATTY)

    @chatty.on_task
    async def chat(task: Task, ctx: Context) -> str:
        return f"{task.input} after {len(ctx.history)} items"

    host = AgentHost(chatty, deployment.settings("agent-chatty"), model=OfflineModel())
    await host.start()
    try:
        client = ChorusClient(operator, S, timeout=30)
        first = await client.run_task(Task(input="one", session_id="conv1"), capability="chat")
        second = await client.run_task(Task(input="two", session_id="conv1"), capability="chat")
    finally:
        await host.stop(timeout=5)
    assert (first.output, second.output) == ("one after 0 items", "two after 2 items")
    assert deployment.violations()[violations:] == []


async def test_an_agent_with_the_same_session_id_as_another_keeps_its_own_conversation(
    deployment: Deployment, operator: Client, coordinator: Coordinator
) -> None:
    """gossip's `conv0` is not chatty's `conv0` (provisioned with one item): its first turn
    starts empty, its second sees its first, and its credentials suffice for all of it."""
    violations = len(deployment.violations())
    gossip = Agent(spec=GOSSIP)

    @gossip.on_task
    async def chat(task: Task, ctx: Context) -> str:
        return f"{task.input} after {len(ctx.history)} items"

    host = AgentHost(gossip, deployment.settings("agent-gossip"), model=OfflineModel())
    await host.start()
    try:
        client = ChorusClient(operator, S, timeout=30)
        first = await client.run_task(Task(input="one", session_id="conv0"), capability="gossip")
        second = await client.run_task(Task(input="two", session_id="conv0"), capability="gossip")
    finally:
        await host.stop(timeout=5)
    assert (first.output, second.output) == ("one after 0 items", "two after 2 items")
    chatty_record = await operator.jetstream().get_last_msg(S.sessions_stream, CHATTY_SESSION)
    assert b"chatty secret" in (chatty_record.data or b"")
    assert deployment.violations()[violations:] == []


async def test_an_agent_records_its_side_effects_under_its_own_keys(
    deployment: Deployment, operator: Client, coordinator: Coordinator
) -> None:
    violations = len(deployment.violations())
    charge = Charge()
    payer = Agent(spec=RESEARCHER)

    @payer.on_task
    async def pay(task: Task, ctx: Context) -> str:
        ledger = EffectLedger(ctx.client.nc, S, owner=ctx.agent_name)  # as AgentHost makes it
        receipts = []
        for attempt in (1, 2):  # the retry of the call gets the recorded result
            call = ToolCallContext(
                agent=ctx.agent_name,
                instance=ctx.instance,
                task_id=task.task_id,
                attempt=attempt,
                effect_scope=task.task_id,
            )
            receipts.append((await ledger.wrap(charge).call({"amount": 5}, call))["receipt"])
        (record,) = await ledger.records(task.task_id)
        return f"{' '.join(receipts)} {record.status} {record.key}"

    host = AgentHost(payer, deployment.settings("agent-researcher"), model=OfflineModel())
    await host.start()
    try:
        task = Task(input="pay")
        result = await ChorusClient(operator, S, timeout=30).run_task(task, capability="research")
    finally:
        await host.stop(timeout=5)
    receipts, status, key = result.output.rsplit(" ", 2)
    assert (receipts, status, charge.runs) == ("r1 r1", "done", 1)
    assert key.startswith(f"researcher.{task.task_id}.charge.")
    assert deployment.violations()[violations:] == []


@pytest.mark.parametrize(
    ("wider", "refusal"),
    [
        (
            {"filter_subject": S.kv_subject(S.effects_bucket, ">")},
            "did not match filtered subject",
        ),
        (
            {"filter_subjects": [S.kv_subject(S.effects_bucket, ">")]},
            "multiple subject filters cannot use subject based API",
        ),
    ],
    ids=["filter_subject", "filter_subjects"],
)
async def test_an_agent_cannot_widen_a_snapshot_filter_the_api_subject_names(
    deployment: Deployment, probe_as: Any, wider: dict[str, Any], refusal: str
) -> None:
    """The consumer's filter in the API subject is what permissions check; nats-server refuses
    a request whose body asks for another filter, so no agent reads beyond its own keys."""
    probe: Probe = await probe_as(AGENT)
    assert probe.nc is not None
    own = S.kv_subject(S.effects_bucket, "researcher.>")
    config = {"name": "wide", "ack_policy": "none", "deliver_policy": "last_per_subject", **wider}
    body = {"stream_name": f"KV_{S.effects_bucket}", "config": config}
    before = await _snapshot(deployment)

    reply = await probe.nc.request(
        f"{API}.CONSUMER.CREATE.KV_{S.effects_bucket}.wide.{own}",
        msgspec.json.encode(body),
        timeout=5,
    )

    error = msgspec.json.decode(reply.data)["error"]
    assert refusal in error["description"], error
    assert await _snapshot(deployment) == before


async def test_the_operator_reads_the_dead_letters(
    deployment: Deployment, operator: Client
) -> None:
    """`chorus dlq` runs as the operator: its reads (a named consumer on the DLQ stream) are
    allowed; deleting letters is denied to everyone else (the attacks above)."""
    violations = len(deployment.violations())

    (letter,) = await DeadLetters(operator, S).list("cap.x")

    assert (letter.queue, letter.kind) == ("cap.x", "unreadable")  # the `{}` provisioned
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
