"""The workflow engine on a real nats-server: pipelines, checkpoints, resume, cancellation."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from nats.aio.client import Client

from chorus.agent import Agent, Context
from chorus.client import ChorusClient
from chorus.client.runstore import KvRunStore
from chorus.config import Settings
from chorus.llm.base import ModelRequest
from chorus.llm.offline import OfflineModel
from chorus.messages import RunCancel, RunProgress, StepRecord, Task, encode
from chorus.workflows import Pipeline, Step, load_workflow
from chorus.workflows.engine import Engine, new_record, run_workflow
from chorus.workflows.progress import NatsProgress, ProgressWatch
from chorus.workflows.runner import DirectRunner
from tests.helpers import ROOT, SpawnAgent, StartHost

EXAMPLES = ROOT / "shared" / "chorus" / "examples"


class Calls:
    """Scripted models that echo `<agent>(<input>)` and count their calls; a gate holds the
    first call of one agent until the test opens it."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.started: dict[str, asyncio.Event] = {}
        self.gates: dict[str, asyncio.Event] = {}

    def model(self, name: str, *, hold_first: bool = False) -> OfflineModel:
        self.started[name] = asyncio.Event()
        if hold_first:
            self.gates[name] = asyncio.Event()

        async def script(request: ModelRequest) -> str:
            self.count[name] += 1
            self.started[name].set()
            if name in self.gates and self.count[name] == 1:
                await self.gates[name].wait()
            return f"{name}({request.input})"

        return OfflineModel(script=script)

    def open_gates(self) -> None:
        for gate in self.gates.values():
            gate.set()


async def start_abc(start_host: StartHost, calls: Calls, *, hold: str = "") -> None:
    for name in ("a", "b", "c"):
        await start_host(Agent(name=name), model=calls.model(name, hold_first=name == hold))


ABC = Pipeline(name="abc", steps=[Step(agent="a"), Step(agent="b"), Step(agent="c")])


async def test_pipeline_passes_each_output_to_the_next_step(
    start_host: StartHost, engine: Engine
) -> None:
    calls = Calls()
    await start_abc(start_host, calls)

    record = await engine.run(new_record(ABC, "x"))

    assert record.status == "completed"
    assert record.output == "c(b(a(x)))"
    assert [s.input for s in record.steps] == ["x", "a(x)", "b(a(x))"]
    assert [s.status for s in record.steps] == ["completed"] * 3
    assert all(s.instance.startswith(s.name) and s.attempts == 1 for s in record.steps)


async def test_a_failing_step_stops_the_run_naming_the_step_and_agent(
    start_host: StartHost, engine: Engine
) -> None:
    calls = Calls()
    broken = Agent(name="b")

    @broken.on_task
    async def fail(task: Task, ctx: Context) -> str:
        raise ValueError("the source is unreachable")

    await start_host(Agent(name="a"), model=calls.model("a"))
    await start_host(broken)
    await start_host(Agent(name="c"), model=calls.model("c"))

    record = await engine.run(new_record(ABC, "x"))

    assert record.status == "failed"
    assert record.error == "step 2 (b) failed: ValueError: the source is unreachable"
    assert record.steps[1].status == "failed"
    assert record.steps[1].code == "task_failed"
    assert calls.count["c"] == 0


async def test_a_step_for_an_agent_nobody_runs_fails_with_a_clear_error(
    start_host: StartHost, engine: Engine
) -> None:
    await start_host(Agent(name="a"))
    workflow = Pipeline(name="ghostly", steps=[Step(agent="a"), Step(capability="ghosts")])

    record = await engine.run(new_record(workflow, "x"))

    assert record.error.startswith(
        "step 2 (capability ghosts) failed: no agent with capability 'ghosts' is running"
    )


async def test_output_template_reshapes_what_the_next_step_gets(
    start_host: StartHost, engine: Engine
) -> None:
    calls = Calls()
    await start_abc(start_host, calls)
    workflow = Pipeline(
        name="shaped",
        steps=[
            Step(agent="a", name="first"),
            Step(agent="b", output="{{ upper(output) }} after {{ steps.first.output }}"),
        ],
    )

    record = await engine.run(new_record(workflow, "x"))

    assert record.output == "B(A(X)) after a(x)"


async def test_python_output_processor_reshapes_what_the_next_step_gets(
    start_host: StartHost, client: ChorusClient
) -> None:
    calls = Calls()
    await start_abc(start_host, calls)

    def first_word(step: StepRecord) -> str:
        return step.output.split("(")[0]

    engine = await Engine.on_nats(client, processors={"first_word": first_word})
    workflow = Pipeline(name="p", steps=[Step(agent="a", processor="first_word"), Step(agent="b")])

    record = await engine.run(new_record(workflow, "x"))

    assert record.steps[0].output == "a"
    assert record.output == "b(a)"


async def test_progress_is_published_as_the_run_goes(
    start_host: StartHost, engine: Engine, nc: Client, settings: Settings
) -> None:
    await start_abc(start_host, Calls())
    record = new_record(ABC, "x")
    seen: list[RunProgress] = []

    async with ProgressWatch(nc, settings.subjects, record.run_id) as watch:
        handle = engine.start(record)
        async for progress in watch:
            seen.append(progress)
        await handle

    assert [(p.kind, p.step) for p in seen] == [
        ("run_started", ""),
        ("step_started", "a"),
        ("step_finished", "a"),
        ("step_started", "b"),
        ("step_finished", "b"),
        ("step_started", "c"),
        ("step_finished", "c"),
        ("run_completed", ""),
    ]
    assert seen[-1].detail == "c(b(a(x)))"


async def test_token_usage_is_summed_over_the_steps(start_host: StartHost, engine: Engine) -> None:
    await start_abc(start_host, Calls())

    record = await engine.run(new_record(ABC, "one two three"))

    assert record.usage.total_tokens > 0
    assert record.usage.total_tokens == sum(s.usage.total_tokens for s in record.steps)
    assert record.usage.input_tokens == sum(s.usage.input_tokens for s in record.steps)


async def test_the_record_in_kv_holds_every_step(
    start_host: StartHost, engine: Engine, nc: Client, settings: Settings
) -> None:
    await start_abc(start_host, Calls())
    record = await engine.run(new_record(ABC, "x"))

    stored = await (await KvRunStore.open(nc.jetstream(), settings.subjects)).load(record.run_id)

    assert stored is not None
    assert stored.status == "completed"
    assert stored.workflow == ABC
    assert [s.output for s in stored.steps] == ["a(x)", "b(a(x))", "c(b(a(x)))"]


async def test_a_resumed_run_does_not_run_finished_steps_again(
    start_host: StartHost, client: ChorusClient, nc: Client, settings: Settings
) -> None:
    calls = Calls()
    await start_abc(start_host, calls, hold="c")
    first = await Engine.on_nats(client)
    handle = first.start(new_record(ABC, "x"))
    try:
        await asyncio.wait_for(calls.started["c"].wait(), 10)  # steps a and b are saved
        handle.interrupt()  # the orchestrator dies
        with pytest.raises(asyncio.CancelledError):
            await handle

        store = await KvRunStore.open(nc.jetstream(), settings.subjects)
        saved = await store.load(handle.run_id)
        assert saved is not None
        assert saved.status == "running"
        assert [s.status for s in saved.steps] == ["completed", "completed", "running"]
        second = Engine(DirectRunner(client), store, progress=NatsProgress(nc, settings.subjects))

        record = await asyncio.wait_for(second.run(saved), 10)
    finally:
        calls.open_gates()

    assert record.status == "completed"
    assert record.output == "c(b(a(x)))"
    assert calls.count == {"a": 1, "b": 1, "c": 2}
    assert record.steps[2].attempts == 1  # the interrupted attempt was sent again, same task id


async def test_a_stale_orchestrator_cannot_overwrite_a_resumed_run(
    start_host: StartHost, client: ChorusClient, nc: Client, settings: Settings
) -> None:
    await start_abc(start_host, Calls())
    stale = await KvRunStore.open(nc.jetstream(), settings.subjects)
    record = new_record(ABC, "x")
    await stale.save(record)
    fresh = await KvRunStore.open(nc.jetstream(), settings.subjects)
    loaded = await fresh.load(record.run_id)
    assert loaded is not None
    await Engine(DirectRunner(client), fresh).run(loaded)

    from chorus.errors import Conflict

    with pytest.raises(Conflict, match="saved by another process"):
        await stale.save(record)


async def test_cancel_marks_the_run_cancelled_and_saves_it(
    start_host: StartHost, engine: Engine, nc: Client, settings: Settings
) -> None:
    calls = Calls()
    await start_abc(start_host, calls, hold="b")
    record = new_record(ABC, "x")
    try:
        async with ProgressWatch(nc, settings.subjects, record.run_id) as watch:
            handle = engine.start(record)
            await asyncio.wait_for(calls.started["b"].wait(), 10)

            assert handle.cancel("the user changed their mind")
            finished = await handle
            kinds = [p.kind async for p in watch]
    finally:
        calls.open_gates()

    assert finished.status == "cancelled"
    assert finished.error == "the user changed their mind"
    assert [s.status for s in finished.steps] == ["completed", "cancelled"]
    assert kinds[-1] == "run_cancelled"
    stored = await (await KvRunStore.open(nc.jetstream(), settings.subjects)).load(record.run_id)
    assert stored is not None and stored.status == "cancelled"
    assert calls.count["c"] == 0


async def test_a_cancel_message_cancels_a_run_started_with_run_workflow(
    start_host: StartHost, client: ChorusClient, nc: Client, settings: Settings
) -> None:
    calls = Calls()
    await start_abc(start_host, calls, hold="a")
    run = asyncio.create_task(run_workflow(client, ABC, "x", run_id="cancel-me"))
    try:
        await asyncio.wait_for(calls.started["a"].wait(), 10)
        await nc.publish(
            settings.subjects.run_cancel("cancel-me"),
            encode(RunCancel(run_id="cancel-me", reason="stop")),
        )
        record = await asyncio.wait_for(run, 10)
    finally:
        calls.open_gates()

    assert record.status == "cancelled"
    assert record.error == "stop"


@pytest.mark.slow
async def test_example_pipeline_runs_on_agent_processes(
    spawn_agent: SpawnAgent, client: ChorusClient
) -> None:
    agents = EXAMPLES / "agents"
    processes = await asyncio.gather(
        *(spawn_agent(agents / f"{name}.yaml") for name in ("researcher", "analyst", "writer"))
    )

    record = await run_workflow(
        client, EXAMPLES / "workflows" / "research-report.yaml", "What is JetStream?"
    )

    assert record.status == "completed", record.error
    assert [s.instance for s in record.steps] == [p.instance for p in processes]
    assert record.steps[1].output.startswith("Findings and analysis for the question")
    assert record.output.startswith("[offline] You are a concise technical writer.")
    assert "What is JetStream?" in record.output


def test_every_example_workflow_loads() -> None:
    kinds = {load_workflow(p).kind for p in Path(EXAMPLES / "workflows").glob("*.yaml")}

    assert kinds == {"pipeline", "parallel", "event", "hierarchical", "process"}
