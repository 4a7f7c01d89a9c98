"""Malformed messages on every subject Chorus listens on cannot take a service down.

Over a thousand bad messages (random bytes, truncated JSON, wrong types, huge strings under
the payload limit, deep nesting, wrong tags, long subject tokens) go to a live coordinator,
orchestrator and agent; then a durable task, a workflow run and the registry read still
work and every process is still connected.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from typing import Any

from nats.aio.client import Client

from chorus.agent import Agent, Context
from chorus.client.durable import TaskQueue
from chorus.client.runs import RunClient
from chorus.client.system import SystemClient
from chorus.config import Settings
from chorus.messages import (
    Event,
    Heartbeat,
    HelpRequest,
    RunCancel,
    RunRequest,
    Task,
    encode,
)
from chorus.nats.streams import ensure_dispatch_stream, ensure_events_stream
from chorus.specs.workflow import Pipeline, Step
from tests.helpers import StartCoordinator, StartHost, StartOrchestrator

PER_FAMILY = 110  # x 11 families: over 1,000 messages
HUGE = 200_000  # characters: under the 1 MB payload limit with room for the envelope
DEEP = 20_000  # nesting levels: past msgspec's recursion
LONG_TOKEN = 3_000  # a subject token; the whole control line must stay under 4 KB


def echo() -> Agent:
    agent = Agent(name="echo", capabilities=["echo"], subscribes=["fuzz.>"])

    @agent.on_task
    async def answer(task: Task, ctx: Context) -> str:
        return f"echo: {task.input}"

    @agent.on_event
    async def heard(event: Event, ctx: Context) -> None:
        return None

    return agent


def samples(instance: str) -> list[dict[str, Any]]:
    """Well-formed messages of each kind, as JSON objects to break."""
    messages = [
        Task(input="hello", capability="echo"),
        HelpRequest(capability="echo", question="why?"),
        Event(topic="fuzz.topic", data={"k": 1}),
        RunCancel(run_id="some-run"),
        RunRequest(workflow=pipeline(), input="q"),
        Heartbeat(
            instance=instance,
            name="echo",
            capabilities=["echo"],
            in_flight=0,
            max_concurrency=1,
            processed=0,
            failed=0,
            mean_latency_ms=0.0,
            interval_s=0.2,
            started_at=0.0,
        ),
    ]
    return [json.loads(encode(message)) for message in messages]


def pipeline() -> Pipeline:
    return Pipeline(name="fuzz", steps=[Step(name="s", agent="echo", instructions="say")])


WRONG_VALUES: tuple[Any, ...] = (None, True, -1, 1e308, "x", [], {}, [[1]], {"a": {"b": None}})


def malformed(rng: random.Random, sample: dict[str, Any]) -> bytes:
    """One broken message, of a kind picked at random."""
    kind = rng.randrange(7)
    if kind == 0:  # random bytes
        return rng.randbytes(rng.randrange(1, 400))
    text = json.dumps(sample)
    if kind == 1:  # truncated JSON
        return text[: rng.randrange(len(text))].encode()
    broken = dict(sample)
    field = rng.choice(sorted(broken))
    if kind == 2:  # a wrong type
        broken[field] = rng.choice(WRONG_VALUES)
    elif kind == 3:  # a huge string (few of them: they are slow to send)
        broken[field] = "A" * (HUGE if rng.random() < 0.05 else rng.randrange(1, 5_000))
    elif kind == 4:  # deep nesting
        return text.replace(f'"{field}":', f'"{field}":' + "[" * DEEP, 1).encode()
    elif kind == 5:  # a wrong or missing tag
        broken["type"] = rng.choice(["", "task ", "heartbeat_v9", "\x00", 7, None])
    else:  # fields missing
        broken = {k: v for k, v in broken.items() if rng.random() < 0.3}
    return json.dumps(broken).encode()


Family = tuple[str, str, Callable[[], str]]  # name, how it is sent, the subject to send to


def families(settings: Settings, instance: str, rng: random.Random) -> list[Family]:
    s = settings.subjects

    def long_token() -> str:
        return "x" * rng.randrange(1, LONG_TOKEN)

    return [
        ("instance task", "request", lambda: s.agent_task(instance)),
        ("named task", "request", lambda: s.named_task("echo")),
        ("capability task", "request", lambda: s.capability_task("echo")),
        ("help", "request", lambda: s.help("echo")),
        ("heartbeat", "publish", lambda: s.heartbeat(instance)),
        ("forged heartbeat subject", "publish", lambda: s.heartbeat(f"echo-{long_token()}")),
        ("dispatch queue", "jetstream", lambda: s.dispatch("cap.echo")),
        ("runs queue", "jetstream", s.run_submit),
        ("run cancel", "publish", lambda: s.run_cancel(long_token())),
        ("events stream", "jetstream", lambda: s.event(f"fuzz.{long_token()}")),
        ("coordinator metrics", "request", lambda: s.metrics),
    ]


def fuzz_plan(settings: Settings, instance: str, seed: int) -> Iterator[tuple[str, str, bytes]]:
    rng = random.Random(seed)
    kinds = samples(instance)
    for _, how, subject in families(settings, instance, rng):
        for _ in range(PER_FAMILY):
            yield how, subject(), malformed(rng, rng.choice(kinds))


async def send(nc: Client, how: str, subject: str, payload: bytes) -> None:
    if how == "jetstream":
        await nc.jetstream().publish(subject, payload, timeout=10)
    elif how == "request":
        # The answer (an error, mostly) goes to an inbox nobody reads: we only check survival.
        await nc.publish(subject, payload, reply=nc.new_inbox())
    else:
        await nc.publish(subject, payload)


async def test_a_thousand_malformed_messages_leave_every_service_working(
    start_coordinator: StartCoordinator,
    start_orchestrator: StartOrchestrator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    coordinator = await start_coordinator()
    orchestrator = await start_orchestrator()
    host = await start_host(echo())
    js = nc.jetstream()
    await ensure_dispatch_stream(js, settings.subjects)
    await ensure_events_stream(js, settings.subjects)

    sent = 0
    for how, subject, payload in fuzz_plan(settings, host.instance, seed=20261202):
        await send(nc, how, subject, payload)
        sent += 1
    await nc.flush(timeout=10)

    queue = TaskQueue(nc, settings.subjects)
    result = await queue.run(Task(input="still here"), capability="echo", timeout=30)
    runs = RunClient(nc, settings.subjects)
    pending = await runs.submit(RunRequest(workflow=pipeline(), input="after the storm"))
    record = await runs.wait(pending.run_id, timeout=30)
    agents = await SystemClient(nc, settings.subjects).agents()

    assert sent >= 1_000
    assert result.output == "echo: still here"
    assert record.status == "completed", record.error
    assert host.instance in {a.instance for a in agents}
    for service in (coordinator.nc, orchestrator.nc, host.nc):
        assert service.is_connected
    # The good messages came after the bad ones on the same queues: every bad one was taken.
    s = settings.subjects
    for stream, consumer in (
        (s.runs_stream, s.runs_consumer),
        (s.dispatch_stream, s.dispatch_consumer("cap.echo")),
    ):
        assert (await js.consumer_info(stream, consumer)).num_pending == 0
    assert (await js.stream_info(s.dead_letter_stream)).state.messages > 0  # they arrived
