"""Budgets: a run stopped by its budget with its spend recorded, `wrap_up`, the overshoot
bound of parallel steps, delegated work charged to the parent run, an agent's hourly budget.

Agents run in this process on the offline model, scripted to spend a known number of
tokens per call; the engine and the budget accounts are on the real server.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import msgspec
import pytest

from chorus.agent import Agent
from chorus.client import ChorusClient
from chorus.config import Settings
from chorus.errors import BudgetExceeded
from chorus.llm.base import FunctionCall, ModelReply, ModelRequest, UserMessage
from chorus.llm.limited import WRAP_UP
from chorus.llm.offline import OfflineModel
from chorus.messages import Task, Usage
from chorus.specs.agent import AgentSpec
from chorus.specs.budget import AgentBudget, RunBudget
from chorus.specs.tools import ToolSpec
from chorus.specs.workflow import Parallel, ParallelTask, Pipeline, Step
from chorus.tools import tool
from chorus.workflows.engine import Engine, new_record
from tests.cli import achorus
from tests.helpers import StartHost, StartOrchestrator

PER_CALL = Usage(40, 10, 50)  # what every scripted model call uses


@tool
async def lookup(term: str) -> str:
    """Look a term up."""
    return f"{term}: found"


def researching(final: str = "best answer") -> Any:
    """A model that keeps calling `lookup` while it has tools, 50 tokens a call; offered no
    tools (the wrap-up turn) it answers, counting the results it was given."""
    ids = itertools.count(1)

    def script(request: ModelRequest) -> ModelReply:
        if request.tools:
            call = FunctionCall(call_id=f"c{next(ids)}", name="lookup", arguments='{"term": "x"}')
            return ModelReply(text="", usage=PER_CALL, tool_calls=(call,), items=(call,))
        seen = sum(1 for i in request.items if isinstance(i, UserMessage))
        return ModelReply(text=f"{final} from {seen} results", usage=PER_CALL)

    return script


def researcher(name: str = "researcher", **spec: Any) -> Agent:
    fields: dict[str, Any] = {"max_turns": 30, "max_concurrency": 8, **spec}
    return Agent(AgentSpec(name=name, instructions="Research.", **fields)).use(lookup)


def with_limits(settings: Settings, tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "limits.yaml"
    path.write_text(text)
    return msgspec.structs.replace(settings, limits=str(path))


async def test_a_run_stopped_by_its_token_budget_fails_with_what_it_spent(
    start_host: StartHost, engine: Engine
) -> None:
    await start_host(researcher(), model=OfflineModel(script=researching()))
    workflow = Pipeline(
        name="research",
        steps=[Step(name="dig", agent="researcher"), Step(name="write", agent="researcher")],
        budget=RunBudget(tokens=120),
    )

    record = await engine.run(new_record(workflow, "NATS"))

    assert record.status == "failed"
    assert record.code == "budget_exceeded"
    assert record.charged is not None
    # three calls of 50 went (the third as the last while 20 were left), the fourth was refused
    assert record.charged.total_tokens == 150
    assert "150 of 120 tokens spent" in record.error
    dig = record.step("dig")
    assert dig is not None and dig.status == "failed" and dig.code == "budget_exceeded"
    assert record.step("write") is None  # never started


async def test_wrap_up_gives_the_agent_one_last_turn_without_tools(
    start_host: StartHost, engine: Engine
) -> None:
    model = OfflineModel(script=researching())
    await start_host(researcher(), model=model)
    workflow = Pipeline(
        name="research",
        steps=[Step(name="dig", agent="researcher"), Step(name="write", agent="researcher")],
        budget=RunBudget(tokens=120, policy="wrap_up"),
    )

    record = await engine.run(new_record(workflow, "NATS"))

    assert record.status == "completed", record.error
    assert record.output == "best answer from 3 results"
    last = model.calls[-1]
    assert last.tools == () and WRAP_UP in last.instructions
    assert len(model.calls) == 4  # three turns with tools, then the wrap-up turn
    assert record.charged is not None and record.charged.total_tokens == 200
    write = record.step("write")
    assert write is not None and write.status == "skipped"
    assert "budget is spent" in write.error


@pytest.mark.parametrize(
    ("reserve", "bound"),
    [
        # holds at least what a call uses: past the budget by at most one call
        (60, 400 + 50),
        # holds below it (the expectation is wrong): at most the 6 calls in flight
        (0, 400 + 6 * 50),
    ],
    ids=["holds-cover-calls", "holds-too-small"],
)
async def test_parallel_steps_overshoot_the_budget_by_no_more_than_the_calls_in_flight(
    start_host: StartHost,
    engine: Engine,
    settings: Settings,
    tmp_path: Path,
    reserve: int,
    bound: int,
) -> None:
    tuned = with_limits(settings, tmp_path, f"reserve_output_tokens: {reserve}\n")
    model = OfflineModel(script=researching(), delay=0.02)  # calls overlap
    await start_host(researcher(), model=model, settings=tuned)
    workflow = Parallel(
        name="spread",
        tasks=[ParallelTask(name=f"t{i}", agent="researcher") for i in range(6)],
        max_concurrency=6,
        budget=RunBudget(tokens=400),
    )

    record = await engine.run(new_record(workflow, "NATS"))

    assert record.status == "failed" and record.code == "budget_exceeded"
    assert record.charged is not None
    assert 400 <= record.charged.total_tokens <= bound
    assert record.charged.total_tokens == 50 * len(model.calls)  # every call was charged


async def test_delegated_work_spends_the_parent_runs_budget(
    start_host: StartHost, engine: Engine
) -> None:
    costly = Usage(100, 100, 200)

    def helper_model(request: ModelRequest) -> ModelReply:
        return ModelReply(text="a long answer", usage=costly)

    def lead_model(request: ModelRequest) -> Any:
        if not request.items:
            return FunctionCall(call_id="c1", name="ask_research", arguments='{"input": "x"}')
        return ModelReply(text="done", usage=Usage(5, 5, 10))

    await start_host(
        Agent(name="helper", capabilities=["research"]),
        model=OfflineModel(script=helper_model),
    )
    lead = AgentSpec(name="lead", tools=[ToolSpec(capability="research", durable=False)])
    await start_host(Agent(lead), model=OfflineModel(script=lead_model))
    workflow = Pipeline(name="lead", steps=[Step(agent="lead")], budget=RunBudget(tokens=150))

    record = await engine.run(new_record(workflow, "NATS"))

    # the lead's first call (a few tokens) asked the helper, whose 200 tokens went on the
    # run's account: the lead's next call found it spent
    assert record.code == "budget_exceeded"
    assert record.charged is not None
    assert record.charged.total_tokens - 200 < 150  # the lead's own part
    assert record.charged.total_tokens >= 200


async def test_an_agent_budget_per_hour_stops_its_calls_across_tasks(
    start_host: StartHost, client: ChorusClient
) -> None:
    def answer(request: ModelRequest) -> ModelReply:
        return ModelReply(text="ok", usage=PER_CALL)

    spec = AgentSpec(name="thrifty", budget=AgentBudget(tokens_per_hour=120))
    await start_host(Agent(spec), model=OfflineModel(script=answer))

    answered = [await client.run_task(Task(input=str(i)), agent="thrifty") for i in range(3)]
    with pytest.raises(BudgetExceeded, match=r"agent\.thrifty\.hour\.\d{10}: 150 of 120 tokens"):
        await client.run_task(Task(input="one more"), agent="thrifty")

    assert [r.output for r in answered] == ["ok", "ok", "ok"]


async def test_chorus_run_with_a_token_budget_fails_saying_what_was_spent(
    start_host: StartHost,
    start_orchestrator: StartOrchestrator,
    settings: Settings,
    tmp_path: Path,
) -> None:
    await start_host(researcher(), model=OfflineModel(script=researching()))
    await start_orchestrator(durable_tasks=False)
    workflow = tmp_path / "dig.yaml"
    workflow.write_text("type: pipeline\nname: dig\nsteps:\n  - agent: researcher\n")

    done = await achorus(settings, "run", str(workflow), "NATS", "--budget-tokens", "120")

    assert done.returncode == 1
    assert "budget exceeded: 150 of 120 tokens spent" in done.stderr
