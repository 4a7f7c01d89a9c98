"""nats-server restarted under a running system: every process reconnects and carries on,
and no submitted run or event is lost (JetStream file storage)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import pytest
from nats.aio.msg import Msg

from chorus.client import ChorusClient
from chorus.client.runs import RunClient
from chorus.config import Settings
from chorus.local import wait_for_instances
from chorus.messages import Event, RunRequest, decode
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer
from chorus.specs.workflow import Pipeline, Step
from tests.helpers import child_env, stop_child, write_spec

REACTOR = """
name: reactor
capabilities: [react]
subscribes: [orders.>]
emits: orders-seen.echo
"""


def spawn(settings: Settings, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = child_env(settings)
    env["CHORUS_CLAIM_TIMEOUT"] = "3"
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "chorus", *args], env=env, stdout=sink, stderr=subprocess.STDOUT
        )


@pytest.mark.xfail(
    reason=(
        "known (issue 10, docs/reliability.md): a run request the server counted delivered to "
        "the orchestrator's pull while it died can wait for its ack wait before it runs, past "
        "this test's 60 s; failed 2 of 6 clean-clone CI runs on 2 loaded cores"
    ),
    strict=False,
)
async def test_restarted_server_loses_no_run_or_event(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "js").start()
    settings = Settings(
        nats_url=server.url, prefix=f"r{uuid.uuid4().hex[:6]}", heartbeat_interval=0.2
    )
    spec = write_spec(tmp_path, "reactor", REACTOR)
    researcher = Path(__file__).parent.parent / "shared/chorus/examples/agents/researcher.yaml"
    children = [
        spawn(settings, tmp_path / "coordinator.log", "coordinator"),
        spawn(settings, tmp_path / "orchestrator.log", "orchestrator"),
        spawn(settings, tmp_path / "researcher.log", "agent", "run", str(researcher)),
        spawn(settings, tmp_path / "reactor.log", "agent", "run", str(spec)),
    ]
    reconnected = asyncio.Event()
    nc = await connect(
        msgspec.structs.replace(settings, connect_wait=10),
        "test",
        service=True,
        reconnected=reconnected,
    )
    try:
        await wait_for_instances(nc, settings.subjects, {"researcher": 1, "reactor": 1}, 30)
        echoes: set[str] = set()
        all_echoed = asyncio.Event()

        async def on_echo(msg: Msg) -> None:
            echoes.add(str(decode(msg.data, Event).data))
            if len(echoes) >= 10:
                all_echoed.set()

        await nc.subscribe(settings.subjects.event("orders-seen.echo"), cb=on_echo)
        runs = RunClient(nc, settings.subjects)
        client = ChorusClient(nc, settings.subjects)
        workflow = Pipeline(
            name="two", steps=[Step(capability="research"), Step(agent="researcher")]
        )
        before = [await runs.submit(RunRequest(workflow=workflow, input=f"q{i}")) for i in range(5)]
        for i in range(5):
            await client.publish_event(Event(topic=f"orders.o{i}", data=f"order {i}"))

        server.stop()  # everything in flight now meets a dead server
        server.start()
        await asyncio.wait_for(reconnected.wait(), 20)  # as a user's retry would wait

        after = [await runs.submit(RunRequest(workflow=workflow, input=f"r{i}")) for i in range(5)]
        for i in range(5, 10):
            await client.publish_event(Event(topic=f"orders.o{i}", data=f"order {i}"))
        records = [await runs.wait(r.run_id, timeout=60) for r in before + after]
        await asyncio.wait_for(all_echoed.wait(), 60)
    finally:
        await nc.close()
        for child in children:
            child.terminate()  # all at once, as a container runtime does
        codes = [stop_child(child, 30) for child in children]
        server.stop()

    assert [r.status for r in records] == ["completed"] * 10, [r.error for r in records]
    assert len(echoes) == 10  # every event reached the subscribed agent
    assert codes == [0, 0, 0, 0]
