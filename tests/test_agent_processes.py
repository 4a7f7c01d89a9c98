"""Agent hosts as real `chorus agent run` processes."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.client import ChorusClient
from chorus.config import Settings
from chorus.errors import ChorusError
from chorus.messages import Event, Heartbeat, Task, decode
from chorus.nats.streams import ensure_events_stream
from tests.helpers import SpawnAgent, write_spec

RESEARCHER = """
name: researcher
instructions: Research it.
capabilities: [research]
max_concurrency: 4
"""


async def test_capability_tasks_are_shared_by_two_replicas(
    spawn_agent: SpawnAgent, nc: Client, settings: Settings, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path, "researcher", RESEARCHER)
    first = await spawn_agent(spec)
    second = await spawn_agent(spec)
    client = ChorusClient(nc, settings.subjects)

    results = await asyncio.gather(
        *(client.run_task(Task(input=f"q{i}"), capability="research") for i in range(40))
    )

    served = Counter(r.instance for r in results)
    assert set(served) == {first.instance, second.instance}
    assert sum(served.values()) == 40


async def test_each_event_reaches_each_agent_name_once_with_two_replicas(
    spawn_agent: SpawnAgent, nc: Client, settings: Settings, tmp_path: Path
) -> None:
    analyst = write_spec(
        tmp_path,
        "analyst",
        """
name: analyst
capabilities: [analysis]
subscribes: [findings.>]
emits: reports.analyst
""",
    )
    auditor = write_spec(
        tmp_path,
        "auditor",
        """
name: auditor
subscribes: [findings.>]
emits: reports.auditor
""",
    )
    for spec in (analyst, analyst, auditor):
        await spawn_agent(spec)
    js = nc.jetstream()
    await ensure_events_stream(js, settings.subjects)
    reports: dict[str, list[Event]] = {"reports.analyst": [], "reports.auditor": []}
    all_in = asyncio.Event()

    async def on_report(msg: Msg) -> None:
        event = decode(msg.data, Event)
        reports[event.topic].append(event)
        if all(len(v) >= 10 for v in reports.values()):
            all_in.set()

    await nc.subscribe(settings.subjects.event("reports.*"), cb=on_report)
    client = ChorusClient(nc, settings.subjects)
    for i in range(10):
        await client.publish_event(Event(topic=f"findings.batch{i}", data={"n": i}))

    await asyncio.wait_for(all_in.wait(), 20)

    for consumer in ("agent-analyst", "agent-auditor"):
        info = await js.consumer_info(settings.subjects.events_stream, consumer)
        assert info.delivered.consumer_seq == 10  # ten deliveries for ten events: none twice
        assert info.num_pending == 0
    assert len(reports["reports.analyst"]) == 10
    assert len(reports["reports.auditor"]) == 10
    handled = sorted(str(e.data) for e in reports["reports.analyst"])
    assert len(set(handled)) == 10


async def test_sigterm_finishes_the_task_in_flight_then_exits_zero(
    spawn_agent: SpawnAgent, nc: Client, settings: Settings, tmp_path: Path
) -> None:
    spec = write_spec(
        tmp_path,
        "slow",
        """
name: slow
capabilities: [slow]
handler: tests.agents.handlers:take_time
""",
    )
    agent = await spawn_agent(spec)
    busy = asyncio.Event()

    async def on_beat(msg: Msg) -> None:
        if decode(msg.data, Heartbeat).in_flight >= 1:
            busy.set()

    await nc.subscribe(settings.subjects.heartbeat(agent.instance), cb=on_beat)
    client = ChorusClient(nc, settings.subjects)
    in_flight = asyncio.create_task(
        client.run_task(Task(input="long job", data=1.5), instance=agent.instance)
    )
    await asyncio.wait_for(busy.wait(), 10)

    agent.signal(signal.SIGTERM)
    result = await asyncio.wait_for(in_flight, 10)

    assert result.output == "done: long job"
    assert await asyncio.to_thread(agent.wait, 15) == 0
    try:
        await client.run_task(Task(input="after"), instance=agent.instance, timeout=1)
        raise AssertionError("a drained agent took new work")
    except ChorusError as exc:
        assert exc.code in ("no_responders", "draining")


async def test_help_request_crosses_processes(
    spawn_agent: SpawnAgent, nc: Client, settings: Settings, tmp_path: Path
) -> None:
    await spawn_agent(write_spec(tmp_path, "researcher", RESEARCHER))
    client = ChorusClient(nc, settings.subjects)

    reply = await client.ask_help("research", "what is JetStream?", timeout=5)

    assert reply.helper == "researcher"
    assert reply.answer == "[offline] Research it.: what is JetStream?"
