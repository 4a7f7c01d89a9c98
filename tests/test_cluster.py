"""A three-node NATS cluster (chorus.nats.cluster) with CHORUS_REPLICAS=3: durable tasks and runs
complete, the leader of the dispatch stream SIGKILLed loses nothing, and it rejoins."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.api import StreamInfo

from chorus.agent import Agent
from chorus.client.durable import TaskQueue
from chorus.client.runs import RunClient
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.errors import ConfigError, NatsAuthRefused
from chorus.local import wait_for_instances
from chorus.messages import RunRequest, Task
from chorus.nats.cluster import NatsCluster, free_ports
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer
from chorus.nats.streams import ensure_dispatch_stream
from chorus.specs.workflow import Pipeline, Step
from chorus.subjects import Subjects
from tests.helpers import StartHost, StartOrchestrator
from tests.test_demo_and_up import mode, operator_settings

WORKFLOW = Pipeline(
    name="two", steps=[Step(capability="work", name="one"), Step(capability="work", name="two")]
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three nodes on free ports with stores in this test's temp dir."""
    with NatsCluster(tmp_path / "cluster", 3, log_dir=tmp_path) as cluster:
        yield cluster


@pytest.fixture
def settings(cluster: NatsCluster) -> Settings:
    """The conftest fixtures (nc, start_coordinator, start_host, ...) on the cluster."""
    return Settings(
        nats_url=cluster.url,
        prefix=f"c{uuid.uuid4().hex[:8]}",
        heartbeat_interval=0.2,
        request_timeout=10,
        replicas=3,
    )


def worker() -> Agent:
    return Agent(name="worker", capabilities=["work"], max_concurrency=4)


async def replicated_info(
    nc: Client, stream: str, *, peers: set[str], timeout: float
) -> StreamInfo:
    """The stream's info once a leader and exactly `peers` (every one current) hold it."""
    js = nc.jetstream()
    async with asyncio.timeout(timeout):
        while True:
            info = await js.stream_info(stream)
            cluster = info.cluster
            if cluster is not None and cluster.leader:
                followers = {p.name for p in cluster.replicas or [] if p.current}
                if followers | {cluster.leader} == peers:
                    return info
            await asyncio.sleep(0.1)  # a poll of the stream's raft group, under the timeout


async def test_a_durable_task_and_a_run_complete_with_three_replicas(
    coordinator: Coordinator,
    start_orchestrator: StartOrchestrator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    await start_orchestrator()
    await start_host(worker())
    queue = TaskQueue(nc, settings.subjects)
    runs = RunClient(nc, settings.subjects)

    result = await queue.run(Task(input="hello"), capability="work", timeout=20)
    run = await runs.wait((await runs.submit(RunRequest(workflow=WORKFLOW, input="q"))).run_id, 30)

    assert result.output == "[offline] : hello"
    assert run.status == "completed", run.error
    s = settings.subjects
    for stream in (
        s.dispatch_stream,
        s.events_stream,
        s.runs_stream,
        s.dead_letter_stream,
        s.chunk_stream,
        f"KV_{s.tasks_bucket}",
        f"KV_{s.agents_bucket}",
        f"KV_{s.runs_bucket}",
        s.state_stream,
    ):
        info = await replicated_info(nc, stream, peers={"n1", "n2", "n3"}, timeout=10)
        assert info.config.num_replicas == 3, stream


async def test_killed_leader_of_the_dispatch_stream_loses_nothing_and_rejoins(
    cluster: NatsCluster,
    coordinator: Coordinator,
    start_orchestrator: StartOrchestrator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    await start_orchestrator()
    await start_host(worker())
    queue = TaskQueue(nc, settings.subjects)
    runs = RunClient(nc, settings.subjects)
    before = [Task(input=f"before {i}") for i in range(5)]
    for task in before:
        await queue.run(task, capability="work", timeout=20)
    run = await runs.wait((await runs.submit(RunRequest(workflow=WORKFLOW, input="q"))).run_id, 30)
    dispatch = settings.subjects.dispatch_stream
    info = await replicated_info(nc, dispatch, peers={"n1", "n2", "n3"}, timeout=10)
    leader = info.cluster.leader if info.cluster else None
    assert leader is not None

    cluster.kill(leader)
    after = [Task(input=f"after {i}") for i in range(5)]
    results = await asyncio.gather(
        *(queue.run(task, capability="work", timeout=45) for task in after)
    )

    assert [r.output for r in results] == [f"[offline] : after {i}" for i in range(5)]
    for task in before:  # what was stored before the kill is still there
        outcome = await queue.outcome(task.task_id)
        assert outcome is not None and outcome.status == "completed", task.task_id
    assert (await runs.get(run.run_id)).status == "completed"
    moved = (await nc.jetstream().stream_info(dispatch)).cluster
    assert moved is not None and moved.leader not in (None, leader)  # a survivor leads it
    await asyncio.to_thread(cluster.restart, leader)
    rejoined = await replicated_info(nc, dispatch, peers={"n1", "n2", "n3"}, timeout=30)
    assert rejoined.config.num_replicas == 3
    assert rejoined.state.messages == 0  # every task queued was taken and acked


async def test_more_replicas_than_the_cluster_has_is_an_error_naming_the_setting(
    nc: Client, settings: Settings
) -> None:
    with pytest.raises(ConfigError, match=r"CHORUS_REPLICAS=5.*at most the number of"):
        await ensure_dispatch_stream(nc.jetstream(), settings.subjects, replicas=5)


async def test_replicas_on_a_single_server_is_an_error_naming_the_setting(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "js") as server:
        settings = Settings(nats_url=server.url, prefix="single", replicas=3)
        client = await connect(settings, "test")
        try:
            with pytest.raises(ConfigError, match=r"CHORUS_REPLICAS=3.*1 for a single server"):
                await Coordinator(client, settings).start()
        finally:
            await client.close()


async def test_a_stream_made_with_one_replica_is_raised_to_the_setting_and_never_lowered(
    nc: Client, settings: Settings
) -> None:
    js = nc.jetstream()
    subjects: Subjects = settings.subjects

    await ensure_dispatch_stream(js, subjects)  # a client first: one replica
    one = (await js.stream_info(subjects.dispatch_stream)).config.num_replicas
    await ensure_dispatch_stream(js, subjects, replicas=3)  # the coordinator
    raised = (await js.stream_info(subjects.dispatch_stream)).config.num_replicas
    await ensure_dispatch_stream(js, subjects)  # a client again
    await ensure_dispatch_stream(js, subjects, replicas=1)  # a service without the setting
    kept = (await js.stream_info(subjects.dispatch_stream)).config.num_replicas

    assert (one, raised, kept) == (1, 3, 3)


def test_replicas_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match="CHORUS_REPLICAS must be 1 to 5"):
        Settings.from_env({"CHORUS_REPLICAS": "0"})
    assert Settings.from_env({"CHORUS_REPLICAS": "3"}).replicas == 3


def consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive ports that are free now (`chorus up --port P`)."""
    for _ in range(50):
        base = free_ports(1)[0]
        if base + count > 65535:
            continue
        try:
            with contextlib.ExitStack() as probes:
                for port in range(base, base + count):
                    probe = probes.enter_context(socket.socket())
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError(f"no {count} consecutive free ports")


async def test_up_with_a_cluster_runs_with_auth_on_every_node_and_three_replicas(
    tmp_path: Path,
) -> None:
    port = consecutive_free_ports(3)
    data = tmp_path / "data"
    up = subprocess.Popen(
        [
            *(sys.executable, "-m", "chorus", "up", "--cluster", "3", "--data-dir", str(data)),
            *("--port", str(port), "--no-gateway", "--agent", "researcher"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The third node alone: every node serves the generated users.
        anonymous = Settings(nats_url=f"nats://127.0.0.1:{port + 2}", connect_wait=30)
        settings = await asyncio.to_thread(operator_settings, data, anonymous)
        nc = await connect(settings, "test")
        try:
            await wait_for_instances(nc, settings.subjects, {"researcher": 1}, timeout=60)
            result = await TaskQueue(nc, settings.subjects).run(
                Task(input="hi"), capability="research", timeout=30
            )
            tasks = await nc.jetstream().stream_info(f"KV_{settings.subjects.tasks_bucket}")
        finally:
            await nc.close()
        with pytest.raises(NatsAuthRefused):
            await connect(anonymous, "test-without-credentials")
    finally:
        up.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(up.wait, 60)
    errors = up.stderr.read() if up.stderr else ""
    if up.stderr:
        up.stderr.close()

    assert code == 0, errors
    assert result.output
    assert tasks.config.num_replicas == 3
    assert tasks.cluster is not None and tasks.cluster.name == "chorus"
    for node in ("n1", "n2", "n3"):
        assert (data / "cluster" / node / "jetstream" / "jetstream").is_dir()
        assert mode(data / "cluster" / f"{node}.conf") == 0o600  # it holds the route password
