"""Cancel and steer reach the work: an agent process (the real `openai` client against the
fake streaming server) stops its model stream when its run is cancelled, a queued task of a
cancelled run never starts, and a steer message is in the model's next request."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from chorus.client.durable import TaskQueue
from chorus.client.runs import RunClient
from chorus.config import Settings
from chorus.messages import RunRequest
from chorus.specs.workflow import Parallel, ParallelTask, Pipeline, Step
from tests.fake_openai import FakeCall, FakeOpenAI
from tests.helpers import SpawnAgent, StartOrchestrator, write_spec

STREAMER = """\
name: streamer
model: openai:fake-model
max_concurrency: 1
"""

LOOKER = """\
name: looker
model: openai:fake-model
max_turns: 4
tools:
  - python: chorus.examples.tools:define
"""

LONG_ANSWER = "word " * 400  # 400 deltas: 20 s at the delay below, unless it is cut short


@pytest.fixture
def openai_env(monkeypatch: pytest.MonkeyPatch, fake_openai: FakeOpenAI) -> FakeOpenAI:
    """Agent processes started from now on talk to the fake server."""
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    return fake_openai


def slow_stream(fake: FakeOpenAI) -> None:
    fake.reply = lambda path, body: LONG_ANSWER
    fake.stream_delay = 0.05


async def until(event: threading.Event, timeout: float = 20) -> None:
    assert await asyncio.to_thread(event.wait, timeout), "the fake model never saw it"


@pytest.mark.usefixtures("coordinator")
async def test_cancel_closes_the_model_stream_in_flight(
    openai_env: FakeOpenAI,
    spawn_agent: SpawnAgent,
    start_orchestrator: StartOrchestrator,
    nc: Client,
    settings: Settings,
    tmp_path: Path,
) -> None:
    slow_stream(openai_env)
    agent = await spawn_agent(write_spec(tmp_path, "streamer", STREAMER))
    await start_orchestrator()
    runs = RunClient(nc, settings.subjects)
    workflow = Pipeline(name="talk", steps=[Step(name="say", agent="streamer")])
    pending = await runs.submit(RunRequest(workflow=workflow, input="go on"))
    await until(openai_env.stream_started)

    await runs.cancel(pending.run_id)
    await until(openai_env.stream_closed, 10)
    record = await runs.wait(pending.run_id, timeout=10)
    outcome = await TaskQueue(nc, settings.subjects).wait(f"{pending.run_id}-say-1", timeout=10)

    assert record.status == "cancelled"
    assert record.steps[0].status == "cancelled"
    assert openai_env.streams_closed == 1
    assert outcome.status == "failed"
    assert [e.code for e in outcome.errors] == ["run_cancelled"]  # not retried
    assert len(openai_env.requests) == 1
    assert agent.process.poll() is None  # the agent goes on serving


@pytest.mark.usefixtures("coordinator")
async def test_a_queued_task_of_a_cancelled_run_is_never_started(
    openai_env: FakeOpenAI,
    spawn_agent: SpawnAgent,
    start_orchestrator: StartOrchestrator,
    nc: Client,
    settings: Settings,
    tmp_path: Path,
) -> None:
    slow_stream(openai_env)
    await spawn_agent(write_spec(tmp_path, "streamer", STREAMER))
    await start_orchestrator()
    runs = RunClient(nc, settings.subjects)
    # The agent takes one task at a time: `second` waits in the dispatch queue.
    workflow = Parallel(
        name="both",
        tasks=[
            ParallelTask(name="first", agent="streamer"),
            ParallelTask(name="second", agent="streamer"),
        ],
        max_concurrency=2,
    )
    pending = await runs.submit(RunRequest(workflow=workflow, input="go on"))
    await until(openai_env.stream_started)

    await runs.cancel(pending.run_id)
    queue = TaskQueue(nc, settings.subjects)
    first = await queue.wait(f"{pending.run_id}-first-1", timeout=10)
    second = await queue.wait(f"{pending.run_id}-second-1", timeout=10)
    record = await runs.wait(pending.run_id, timeout=10)

    assert record.status == "cancelled"
    assert [e.code for e in first.errors] == ["run_cancelled"]
    assert [e.code for e in second.errors] == ["run_cancelled"]
    assert "before this task started" in second.errors[0].reason
    assert len(openai_env.requests) == 1  # the second task never reached the model


def user_texts(body: dict[str, Any]) -> list[str]:
    items = body.get("input")
    if not isinstance(items, list):
        return [str(items)]
    return [str(i.get("content")) for i in items if i.get("role") == "user"]


@pytest.mark.usefixtures("coordinator")
async def test_a_steer_message_is_in_the_models_next_request(
    openai_env: FakeOpenAI,
    spawn_agent: SpawnAgent,
    start_orchestrator: StartOrchestrator,
    nc: Client,
    settings: Settings,
    tmp_path: Path,
) -> None:
    asked, steered = threading.Event(), threading.Event()

    def reply(path: str, body: dict[str, Any]) -> str | list[FakeCall]:
        if not asked.is_set():  # the first turn: held until the steer message is stored
            asked.set()
            steered.wait(20)
            return [FakeCall("call-1", "define", '{"text": "nats"}')]
        return "done"

    openai_env.reply = reply
    await spawn_agent(write_spec(tmp_path, "looker", LOOKER))
    await start_orchestrator()
    runs = RunClient(nc, settings.subjects)
    workflow = Pipeline(name="look", steps=[Step(name="look", agent="looker")])
    pending = await runs.submit(RunRequest(workflow=workflow, input="What is NATS?"))
    await until(asked)

    await runs.steer(pending.run_id, "Answer in French.")
    steered.set()
    record = await runs.wait(pending.run_id, timeout=20)

    assert record.status == "completed", record.error
    first, second = (body for _, body in openai_env.requests)
    assert "Answer in French." not in user_texts(first)
    assert user_texts(second)[-1] == "Answer in French."
