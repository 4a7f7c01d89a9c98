"""Shared provider limits and pauses across real agent processes, and fallback models.

The agents call the fake OpenAI server through the real `openai` client; the server counts
what it received per window, as the provider's own limit would.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from chorus.agent import Agent
from chorus.agent.host import AgentHost
from chorus.client import ChorusClient
from chorus.config import Settings
from chorus.errors import RateLimited
from chorus.messages import LimitWindow, Result, Task
from chorus.nats.connection import connect
from chorus.specs.agent import AgentSpec
from chorus.specs.workflow import Pipeline, Step
from chorus.spend.limiter import Limiter
from chorus.spend.limits import LimitsFile, LimitSpec, account_id
from chorus.workflows.engine import Engine, new_record
from tests.fake_openai import FakeOpenAI
from tests.helpers import SpawnAgent, write_spec

WINDOW_S = 2.0
WRITER = """\
name: {name}
capabilities: [write]
instructions: You are {name}.
model: openai:gpt-test
max_concurrency: 3
"""


def openai_env(fake: FakeOpenAI, **extra: str) -> dict[str, str]:
    return {"OPENAI_API_KEY": "sk-shared", "OPENAI_BASE_URL": fake.base_url, **extra}


async def four_writers(
    spawn_agent: SpawnAgent,
    client: ChorusClient,
    fake: FakeOpenAI,
    tmp_path: Path,
    env: dict[str, str],
) -> list[str]:
    """Four agent processes with the capability `write`, each past its first model call (the
    openai client's first call spends ~0.3 s on lazy imports between the limiter letting it
    through and sending it); returns their names."""
    names = [f"writer-{letter}" for letter in "abcd"]
    for name in names:
        await spawn_agent(write_spec(tmp_path, name, WRITER.format(name=name)), env=env)
    for name in names:
        await client.run_task(Task(input="warm up"), agent=name, timeout=30)
    fake.reset()
    return names


async def write_all(client: ChorusClient, count: int) -> list[Result]:
    tasks = [
        client.run_task(Task(input=f"note {i}"), capability="write", timeout=60)
        for i in range(count)
    ]
    return await asyncio.gather(*tasks)


@pytest.mark.slow
async def test_four_agent_processes_never_exceed_their_shared_limit_in_any_window(
    spawn_agent: SpawnAgent, client: ChorusClient, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    limits = tmp_path / "limits.yaml"
    limits.write_text(
        f"window_s: {WINDOW_S}\n"
        "reserve_output_tokens: 20\n"  # what the echo answers: requests bind, not tokens
        "limits:\n"
        "  - name: shared-key\n"
        "    api_key: OPENAI_API_KEY\n"
        "    requests_per_minute: 8\n"
        "    tokens_per_minute: 2000\n"
        "    margin_s: 0.25\n"  # room for the time from admission to the server
    )
    env = openai_env(fake_openai, CHORUS_LIMITS=str(limits))
    await four_writers(spawn_agent, client, fake_openai, tmp_path, env)

    results = await write_all(client, 24)

    assert sorted(r.output for r in results) == sorted(f"echo: note {i}" for i in range(24))
    assert len({r.instance for r in results}) == 4
    requests, tokens = fake_openai.peak(WINDOW_S)
    assert requests == 8  # the allowance was used, and never passed
    assert tokens <= 2000
    arrivals = sorted(a.time for a in fake_openai.arrivals)
    assert arrivals[-1] - arrivals[0] >= 2 * WINDOW_S  # 24 requests took three windows


@pytest.mark.slow
async def test_a_429_with_retry_after_pauses_all_four_processes(
    spawn_agent: SpawnAgent, client: ChorusClient, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    names = await four_writers(spawn_agent, client, fake_openai, tmp_path, openai_env(fake_openai))
    fake_openai.delay = 0.1  # calls overlap, so every process has work when the 429 comes
    writing = asyncio.ensure_future(write_all(client, 40))
    await asyncio.to_thread(fake_openai.wait_for, 6, 20)
    fake_openai.fail_next(429, retry_after=1.5)

    results = await writing

    assert len(results) == 40
    [refused] = [a for a in fake_openai.arrivals if a.status == 429]
    during = [a for a in fake_openai.arrivals if refused.time + 0.3 < a.time < refused.time + 1.5]
    assert during == []  # nobody called while paused (0.3 s: calls already on their way)
    after = {a.instructions for a in fake_openai.arrivals if a.time >= refused.time + 1.5}
    assert after == {f"You are {name}." for name in names}  # and all four went on after


async def test_a_rate_limited_model_falls_back_and_the_answer_says_which_model(
    openai_environ: FakeOpenAI, settings: Settings, client: ChorusClient, engine: Engine
) -> None:
    spec = AgentSpec(
        name="writer",
        model="openai:gpt-big",
        fallback=["openai:gpt-small"],
        fallback_after_s=0.5,
    )
    host = AgentHost(Agent(spec), msgspec.structs.replace(settings))
    await host.start()
    try:
        openai_environ.fail_next(429, retry_after=30, model="gpt-big")

        first = await client.run_task(Task(input="one"), agent="writer")
        second = await client.run_task(Task(input="two"), agent="writer")
        record = await engine.run(new_record(Pipeline(name="w", steps=[Step(agent="writer")])))
    finally:
        await host.stop(timeout=5)

    assert (first.model, second.model) == ("gpt-small", "gpt-small")
    # gpt-big said 429 once; paused for 30 s, it was not asked again
    assert [(a.model, a.status) for a in openai_environ.arrivals] == [
        ("gpt-big", 429),
        ("gpt-small", 200),
        ("gpt-small", 200),
        ("gpt-small", 200),
    ]
    [step] = record.steps
    assert step.model == "gpt-small"
    assert set(record.by_model) == {"gpt-small"}
    # every call was streamed (the tasks' live output): the fallback happened before any
    # text was shown, and the streamed answers were priced and recorded like complete()'s
    assert all(body.get("stream") for _, body in openai_environ.requests)


async def test_a_call_that_cannot_wait_for_room_is_told_when_there_will_be_some(
    settings: Settings,
) -> None:
    config = LimitsFile(
        window_s=WINDOW_S,
        limits=[LimitSpec(name="tiny", api_key="KEY", requests_per_minute=2)],
    )
    env = {"KEY": "sk-tiny"}
    connections = [await connect(settings, f"process-{i}") for i in range(2)]
    limiters = [
        await Limiter.open(nc.jetstream(), settings.subjects, config, env, instance=f"p{i}")
        for i, nc in enumerate(connections)
    ]
    try:
        gates = [
            await limiter.gate("openai:gpt-test", account_id("sk-tiny")) for limiter in limiters
        ]
        first = await gates[0].admit(10, wait=None)
        second = await gates[1].admit(10, wait=None)  # the other process: the last room

        with pytest.raises(RateLimited) as refused:
            await gates[0].admit(10, wait=0.3)

        assert refused.value.retry_after is not None
        assert 0 < refused.value.retry_after <= WINDOW_S + 0.2
        for permit in (first, second):
            permit.settle(10)
        await asyncio.gather(*(limiter.drain() for limiter in limiters))
        stored = await limiters[1].kv.get(settings.subjects.limit_key("tiny"))
        window = msgspec.json.decode(stored.value or b"", type=LimitWindow)
        assert sum(requests for _, requests, _ in window.slots) == 2  # the refused one left none
    finally:
        for limiter in limiters:
            await limiter.close()
        for nc in connections:
            await nc.close()
