"""Parallel, event-driven, hierarchical and business-process runs on a real nats-server."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.agent import Agent, Context
from chorus.client.runstore import KvRunStore
from chorus.config import Settings
from chorus.llm.base import ModelRequest
from chorus.llm.offline import OfflineModel
from chorus.messages import DelegationPlan, PlanResults, Task
from chorus.nats.streams import ensure_events_stream
from chorus.workflows import (
    EventDriven,
    Hierarchical,
    Parallel,
    ParallelTask,
    Process,
    ProcessStep,
    load_workflow,
)
from chorus.workflows.engine import Engine, new_record
from tests.helpers import ROOT, StartHost

EXAMPLES = ROOT / "shared" / "chorus" / "examples"


def echo(name: str) -> OfflineModel:
    return OfflineModel(script=lambda request: f"{name}({request.input})")


# parallel


class Gauge:
    """Counts model calls in flight across every agent instance; keeps the peak."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def model(self) -> OfflineModel:
        async def script(request: ModelRequest) -> str:
            self.now += 1
            self.peak = max(self.peak, self.now)
            try:
                await asyncio.sleep(0.05)  # simulated model latency, so tasks overlap
            finally:
                self.now -= 1
            return f"done({request.input})"

        return OfflineModel(script=script)


async def test_parallel_never_exceeds_max_concurrency(
    start_host: StartHost, engine: Engine
) -> None:
    gauge = Gauge()
    for _ in range(3):  # 30 free slots in all: only the workflow's limit can hold it to 2
        await start_host(
            Agent(name="worker", capabilities=["work"], max_concurrency=10), model=gauge.model()
        )
    workflow = Parallel(
        name="burst",
        max_concurrency=2,
        tasks=[ParallelTask(name=f"t{i}", capability="work", input=f"job {i}") for i in range(8)],
    )

    record = await engine.run(new_record(workflow, "x"))

    assert record.status == "completed"
    assert gauge.peak == 2
    assert [s.output for s in record.steps] == [f"done(job {i})" for i in range(8)]


async def test_parallel_task_failure_does_not_sink_the_others(
    start_host: StartHost, engine: Engine
) -> None:
    broken = Agent(name="broken")

    @broken.on_task
    async def fail(task: Task, ctx: Context) -> str:
        raise RuntimeError("out of coffee")

    await start_host(broken)
    await start_host(Agent(name="ok"), model=echo("ok"))
    workflow = Parallel(
        name="mixed",
        tasks=[
            ParallelTask(name="one", agent="ok"),
            ParallelTask(name="two", agent="broken"),
            ParallelTask(name="three", agent="ok", input="{{ upper(input) }}"),
        ],
    )

    record = await engine.run(new_record(workflow, "q"))

    assert record.status == "completed"
    one, two, three = record.steps
    assert (one.succeeded, one.agent, one.output) == (True, "ok", "ok(q)")
    assert (two.succeeded, two.agent, two.error) == (False, "broken", "RuntimeError: out of coffee")
    assert (three.succeeded, three.output) == (True, "ok(Q)")
    assert all(s.duration_ms > 0 for s in record.steps)
    assert record.output == "## one\nok(q)\n\n## three\nok(Q)"


async def test_parallel_run_fails_when_fewer_than_min_success_succeed(
    start_host: StartHost, engine: Engine
) -> None:
    await start_host(Agent(name="ok"), model=echo("ok"))
    workflow = Parallel(
        name="strict",
        min_success=2,
        tasks=[ParallelTask(name="one", agent="ok"), ParallelTask(name="two", agent="gone")],
    )

    record = await engine.run(new_record(workflow, "q"))

    assert record.status == "failed"
    assert record.error.startswith(
        "1 of 2 tasks succeeded and 2 must: task two (gone) failed: no agent named 'gone'"
    )


# event-driven


async def consumers_ready(nc: Client, settings: Settings, *names: str) -> asyncio.Event:
    """Set once every named agent's event consumer exists (JetStream advisories, no polling)."""
    await ensure_events_stream(nc.jetstream(), settings.subjects)
    waiting = {settings.subjects.event_consumer(n) for n in names}
    ready = asyncio.Event()

    async def created(msg: Msg) -> None:
        waiting.discard(msg.subject.rsplit(".", 1)[-1])
        if not waiting:
            ready.set()

    stream = settings.subjects.events_stream
    await nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.CREATED.{stream}.*", cb=created)
    return ready


def relay(name: str, listens: str, emits: str) -> Agent:
    agent = Agent(name=name, subscribes=[listens])

    @agent.on_event
    async def pass_on(event: Any, ctx: Context) -> str:
        ctx.emit(emits, {"from": name, "saw": event.data})
        return "ok"

    return agent


async def test_event_run_follows_its_chain_of_events_until_the_final_topic(
    start_host: StartHost, engine: Engine, nc: Client, settings: Settings
) -> None:
    ready = await consumers_ready(nc, settings, "checker", "shipper")
    await start_host(relay("checker", "orders.placed", "orders.checked"))
    await start_host(relay("shipper", "orders.checked", "orders.shipped"))
    await asyncio.wait_for(ready.wait(), 10)
    workflow = EventDriven(name="order", start="orders.placed", until="orders.shipped", timeout=10)

    record = await engine.run(new_record(workflow, "order 42"))

    assert record.status == "completed", record.error
    assert [e.topic for e in record.events] == ["orders.placed", "orders.checked", "orders.shipped"]
    assert {e.run_id for e in record.events} == {record.run_id}
    assert [e.source for e in record.events] == ["workflow:order", "checker", "shipper"]
    assert record.output_data == {"from": "shipper", "saw": {"from": "checker", "saw": "order 42"}}


async def test_event_run_counts_the_tokens_of_the_agents_that_reacted(
    start_host: StartHost, engine: Engine, nc: Client, settings: Settings
) -> None:
    ready = await consumers_ready(nc, settings, "analyst")
    await start_host(Agent(name="analyst", subscribes=["findings.>"], emits="reports.ready"))
    await asyncio.wait_for(ready.wait(), 10)
    workflow = EventDriven(name="f", start="findings.new", until="reports.ready", timeout=10)

    record = await engine.run(new_record(workflow, "a finding"))

    assert record.status == "completed", record.error
    assert record.events[-1].usage.total_tokens > 0  # the analyst asked its model
    assert record.usage.total_tokens == record.events[-1].usage.total_tokens


async def test_event_run_ignores_the_events_of_other_runs(
    start_host: StartHost, engine: Engine, nc: Client, settings: Settings
) -> None:
    ready = await consumers_ready(nc, settings, "checker")
    await start_host(relay("checker", "orders.placed", "orders.checked"))
    await asyncio.wait_for(ready.wait(), 10)
    workflow = EventDriven(name="order", start="orders.placed", until="orders.checked", timeout=10)

    first, second = await asyncio.gather(
        engine.run(new_record(workflow, "first")), engine.run(new_record(workflow, "second"))
    )

    assert first.output_data == {"from": "checker", "saw": "first"}
    assert second.output_data == {"from": "checker", "saw": "second"}
    assert len(first.events) == len(second.events) == 2


async def test_event_run_fails_when_the_final_topic_never_comes(engine: Engine) -> None:
    workflow = EventDriven(name="lonely", start="pings.sent", until="pongs.>", timeout=0.3)

    record = await engine.run(new_record(workflow, "hello"))

    assert record.status == "failed"
    assert record.error == (
        "no event on pongs.> for this run within 0.3s (events seen: pings.sent)"
    )


async def test_example_event_workflow_completes_with_the_example_analyst(
    start_host: StartHost, engine: Engine, nc: Client, settings: Settings
) -> None:
    from chorus.specs.agent import load_spec

    ready = await consumers_ready(nc, settings, "analyst")
    await start_host(Agent(load_spec(EXAMPLES / "agents" / "analyst.yaml")))
    await asyncio.wait_for(ready.wait(), 10)

    record = await engine.run(
        new_record(load_workflow(EXAMPLES / "workflows" / "findings.yaml"), "the sky is blue")
    )

    assert record.status == "completed", record.error
    assert [e.topic for e in record.events] == ["findings.new", "reports.ready"]
    assert "the sky is blue" in record.output


# hierarchical

PLAN = {
    "subtasks": [
        {
            "id": "facts",
            "description": "Collect the facts",
            "capabilities": ["research"],
            "depends_on": [],
        },
        {
            "id": "context",
            "description": "Find the history",
            "capabilities": ["research"],
            "depends_on": [],
        },
        {
            "id": "weigh",
            "description": "Weigh the facts",
            "capabilities": ["analysis"],
            "depends_on": ["facts", "context"],
        },
    ]
}


def supervisor(plan: Any, received: list[Any]) -> tuple[Agent, OfflineModel]:
    """A supervisor whose model answers `plan` when asked for one, and compiles otherwise."""
    agent = Agent(name="lead", capabilities=["planning"])

    @agent.on_task
    async def supervise(task: Task, ctx: Context) -> Any:
        received.append(task)
        reply = await ctx.ask_model(task.input, json_schema=task.json_schema)
        return reply.data if task.json_schema else reply.text

    def script(request: ModelRequest) -> Any:
        return plan if request.json_schema is not None else f"compiled from {request.input!r}"

    return agent, OfflineModel(script=script)


async def start_workers(start_host: StartHost) -> dict[str, OfflineModel]:
    models = {
        "researcher": OfflineModel(
            script=lambda r: f"research on {r.input.splitlines()[0]}", delay=0.05
        ),
        "analyst": OfflineModel(script=lambda r: f"analysis of: {r.input}"),
    }
    await start_host(
        Agent(name="researcher", capabilities=["research"]), model=models["researcher"]
    )
    await start_host(Agent(name="analyst", capabilities=["analysis"]), model=models["analyst"])
    return models


async def test_hierarchical_run_plans_delegates_and_compiles(
    start_host: StartHost, engine: Engine
) -> None:
    received: list[Task] = []
    agent, model = supervisor(PLAN, received)
    await start_host(agent, model=model)
    await start_workers(start_host)

    record = await engine.run(
        new_record(Hierarchical(name="brief", supervisor="lead"), "Why NATS?")
    )

    assert record.status == "completed", record.error
    assert record.plan == msgspec.convert(PLAN, DelegationPlan)
    assert [s.name for s in record.steps] == [
        "plan",
        "subtask-facts",
        "subtask-context",
        "subtask-weigh",
        "compile",
    ]
    facts, context, weigh = record.steps[1:4]
    assert (facts.agent, context.agent, weigh.agent) == ("researcher", "researcher", "analyst")
    assert facts.output == "research on Collect the facts"
    # independent subtasks overlap; the dependent one starts after both ended
    assert facts.started_at < context.ended_at and context.started_at < facts.ended_at
    assert weigh.started_at >= max(facts.ended_at, context.ended_at)
    assert "[facts] research on Collect the facts" in weigh.input
    plan_task, compile_task = received
    assert plan_task.json_schema is not None
    results = msgspec.convert(compile_task.data, PlanResults)
    assert results.goal == "Why NATS?"
    assert [(r.id, r.agent) for r in results.results] == [
        ("facts", "researcher"),
        ("context", "researcher"),
        ("weigh", "analyst"),
    ]
    assert record.output.startswith("compiled from 'Goal: Why NATS?")


async def test_hierarchical_plan_needing_a_missing_capability_fails_before_dispatch(
    start_host: StartHost, engine: Engine
) -> None:
    plan = {
        "subtasks": [
            *PLAN["subtasks"][:2],
            {
                "id": "law",
                "description": "Check the law",
                "capabilities": ["legal"],
                "depends_on": [],
            },
        ]
    }
    agent, model = supervisor(plan, [])
    await start_host(agent, model=model)
    workers = await start_workers(start_host)

    record = await engine.run(new_record(Hierarchical(name="brief", supervisor="lead"), "q"))

    assert record.status == "failed"
    assert record.error.startswith(
        "subtask law needs capability 'legal', which no running agent has (running agents "
        "offer: analysis, planning, research)"
    )
    assert record.plan is not None
    assert workers["researcher"].calls == []


@pytest.mark.parametrize(
    ("plan", "problem"),
    [
        (
            {"subtasks": [{"id": "a", "description": "x", "capabilities": ["research"]}]},
            "the plan does not match the DelegationPlan schema: Object missing required field "
            "`depends_on` - at `$.subtasks[0]`",
        ),
        (
            {
                "subtasks": [
                    {
                        "id": "a",
                        "description": "x",
                        "capabilities": ["research"],
                        "depends_on": ["zz"],
                    }
                ]
            },
            "subtask a depends on zz, which the plan does not have",
        ),
        (
            {
                "subtasks": [
                    {
                        "id": "a",
                        "description": "x",
                        "capabilities": ["research"],
                        "depends_on": ["b"],
                    },
                    {
                        "id": "b",
                        "description": "y",
                        "capabilities": ["research"],
                        "depends_on": ["a"],
                    },
                ]
            },
            "the plan's dependencies go round in a circle: a -> b -> a",
        ),
    ],
    ids=["schema", "unknown-dependency", "cycle"],
)
async def test_hierarchical_run_refuses_an_invalid_plan(
    start_host: StartHost, engine: Engine, plan: Any, problem: str
) -> None:
    agent, model = supervisor(plan, [])
    await start_host(agent, model=model)
    workers = await start_workers(start_host)

    record = await engine.run(new_record(Hierarchical(name="brief", supervisor="lead"), "q"))

    assert record.status == "failed"
    assert record.error == f"the supervisor lead gave no usable plan: {problem}"
    assert workers["researcher"].calls == []


# business process

REVIEW = load_workflow(EXAMPLES / "workflows" / "vendor-review.yaml")


async def start_process_agents(start_host: StartHost, research: str = "Acme makes anvils") -> None:
    await start_host(
        Agent(name="researcher", capabilities=["research"]),
        model=OfflineModel(script=lambda r: research),
    )
    await start_host(Agent(name="analyst", capabilities=["analysis"]), model=echo("risk"))
    await start_host(Agent(name="writer", capabilities=["writing"]), model=echo("note"))


async def test_process_runs_the_steps_whose_conditions_hold(
    start_host: StartHost, engine: Engine
) -> None:
    await start_process_agents(start_host)

    record = await engine.run(new_record(REVIEW, "Acme", data={"vendor": "Acme", "amount": 25000}))

    assert record.status == "completed", record.error
    assert {s.name: s.status for s in record.steps} == {
        "research": "completed",
        "assess": "completed",
        "escalate": "completed",
        "approve": "skipped",
    }
    assert record.steps[3].error == "`data.amount <= 10000` is false"
    assert record.output.startswith("note(Escalation note: contract of 25000 with Acme.")


async def test_process_takes_the_other_branch_for_other_data(
    start_host: StartHost, engine: Engine
) -> None:
    await start_process_agents(start_host)

    record = await engine.run(new_record(REVIEW, "Acme", data={"vendor": "Acme", "amount": 500}))

    assert [s.status for s in record.steps] == ["completed", "completed", "skipped", "completed"]
    assert record.output.startswith("note(Approval note for Acme.")


async def test_process_fails_at_the_step_whose_requirement_is_not_met(
    start_host: StartHost, engine: Engine, nc: Client, settings: Settings
) -> None:
    await start_process_agents(start_host, research="   ")

    record = await engine.run(new_record(REVIEW, "Acme", data={"vendor": "Acme", "amount": 500}))

    assert record.status == "failed"
    assert record.error == (
        "step assess: requirement `len(strip(steps.research.output)) > 0` is not met"
    )
    assert [s.status for s in record.steps] == ["completed", "failed"]
    stored = await (await KvRunStore.open(nc.jetstream(), settings.subjects)).load(record.run_id)
    assert stored is not None and stored.status == "failed"


async def test_process_status_is_running_in_kv_while_a_step_works(
    start_host: StartHost, engine: Engine, nc: Client, settings: Settings
) -> None:
    gate, started = asyncio.Event(), asyncio.Event()

    async def slow(request: ModelRequest) -> str:
        started.set()
        await gate.wait()
        return "done"

    await start_host(Agent(name="clerk"), model=OfflineModel(script=slow))
    workflow = Process(name="file", steps=[ProcessStep(name="file", agent="clerk")])
    handle = engine.start(new_record(workflow, "form"))
    store = await KvRunStore.open(nc.jetstream(), settings.subjects)
    try:
        await asyncio.wait_for(started.wait(), 10)
        running = await store.load(handle.run_id)
    finally:
        gate.set()
    finished = await handle
    completed = await store.load(handle.run_id)

    assert running is not None and running.status == "running"
    assert running.steps[0].status == "running"
    assert finished.status == "completed"
    assert completed is not None and completed.status == "completed"


async def test_process_condition_that_cannot_be_evaluated_fails_naming_the_step(
    start_host: StartHost, engine: Engine
) -> None:
    await start_host(Agent(name="clerk"), model=echo("clerk"))
    workflow = Process(
        name="typo",
        steps=[
            ProcessStep(name="first", agent="clerk"),
            ProcessStep(name="second", agent="clerk", when="steps.first.data.score > 3"),
        ],
    )

    record = await engine.run(new_record(workflow, "x"))

    assert record.status == "failed"
    assert record.error == (
        "step second: expression `steps.first.data.score > 3`: cannot read "
        "steps.first.data.score: steps.first.data is NoneType, not a mapping"
    )
