"""The orchestrator: durable runs through the coordinator, resumed after a SIGKILL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.agent import Agent, Context
from chorus.client.runs import RunClient
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.llm.offline import OfflineModel
from chorus.messages import RunProgress, RunRequest, Task, decode
from chorus.specs.workflow import Parallel, ParallelTask, Pipeline, Step
from tests.helpers import Reap, StartHost, StartOrchestrator, child_env, stop_child


def counting(name: str, calls: Counter[str], *, capability: str = "", delay: float = 0) -> Agent:
    agent = Agent(name=name, capabilities=[capability or name], max_concurrency=4)

    @agent.on_task
    async def answer(task: Task, ctx: Context) -> str:
        calls[task.step] += 1
        reply = await ctx.ask_model(task.input)
        return f"{name}({task.step}): {reply.text}"

    return agent


def pipeline(steps: int) -> Pipeline:
    return Pipeline(
        name="chain",
        steps=[Step(name=f"s{i}", agent="worker", instructions=f"step {i}") for i in range(steps)],
    )


async def test_a_submitted_run_completes_through_the_coordinator(
    coordinator: Coordinator,
    start_orchestrator: StartOrchestrator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    calls: Counter[str] = Counter()
    await start_host(counting("worker", calls))
    await start_orchestrator()
    runs = RunClient(nc, settings.subjects)

    pending = await runs.submit(RunRequest(workflow=pipeline(3), input="q"))
    record = await runs.wait(pending.run_id, timeout=20)

    assert pending.status == "pending"
    assert record.status == "completed", record.error
    assert [s.status for s in record.steps] == ["completed"] * 3
    assert record.output.startswith("worker(s2)")
    assert calls == Counter({"s0": 1, "s1": 1, "s2": 1})
    assert record.usage.total_tokens > 0


async def test_a_named_workflow_runs_from_the_examples(
    coordinator: Coordinator,
    start_orchestrator: StartOrchestrator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    calls: Counter[str] = Counter()
    await start_host(counting("researcher", calls, capability="research"))
    await start_host(counting("analyst", calls, capability="analysis"))
    await start_host(counting("writer", calls, capability="writing"))
    await start_orchestrator()
    runs = RunClient(nc, settings.subjects)

    pending = await runs.submit(
        RunRequest(workflow_name="research-report", input="What is JetStream?")
    )
    record = await runs.wait(pending.run_id, timeout=20)

    assert record.status == "completed", record.error
    assert record.workflow.name == "research-report"
    assert len(record.steps) == 3


def spawn_orchestrator(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = child_env(settings)
    env["CHORUS_CLAIM_TIMEOUT"] = "2"
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "chorus", "orchestrator"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


async def progress_until(
    nc: Client, settings: Settings, run_id: str, accept: Callable[[RunProgress], bool]
) -> asyncio.Future[RunProgress]:
    """A future set by the first progress message of the run that `accept`s."""
    seen: asyncio.Future[RunProgress] = asyncio.get_running_loop().create_future()

    async def on_progress(msg: Msg) -> None:
        progress = decode(msg.data, RunProgress)
        if accept(progress) and not seen.done():
            seen.set_result(progress)

    await nc.subscribe(settings.subjects.run_all(run_id), cb=on_progress)
    return seen


async def test_killed_orchestrator_mid_pipeline_resumes_without_rerunning_steps(
    coordinator: Coordinator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
    tmp_path: Path,
    reap: Reap,
) -> None:
    calls: Counter[str] = Counter()
    await start_host(counting("worker", calls), model=OfflineModel(delay=0.3))
    runs = RunClient(nc, settings.subjects)
    log = tmp_path / "orchestrator.log"
    first = reap(spawn_orchestrator(settings, log))
    request = RunRequest(workflow=pipeline(4), input="q")
    halfway = await progress_until(
        nc, settings, request.run_id, lambda p: p.kind == "step_finished" and p.step == "s1"
    )
    await runs.submit(request)
    await asyncio.wait_for(halfway, 30)

    first.kill()
    first.wait(10)
    second = reap(spawn_orchestrator(settings, log))
    record = await runs.wait(request.run_id, timeout=40)
    assert stop_child(second) == 0, log.read_text()

    assert record.status == "completed", record.error
    assert calls["s0"] == 1 and calls["s1"] == 1  # finished steps were not run again
    assert calls["s2"] == 1 and calls["s3"] == 1  # an interrupted step was answered once
    assert [s.status for s in record.steps] == ["completed"] * 4


async def test_killed_orchestrator_mid_parallel_resumes_without_rerunning_tasks(
    coordinator: Coordinator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
    tmp_path: Path,
    reap: Reap,
) -> None:
    calls: Counter[str] = Counter()
    await start_host(counting("worker", calls), model=OfflineModel(delay=0.3))
    runs = RunClient(nc, settings.subjects)
    log = tmp_path / "orchestrator.log"
    first = reap(spawn_orchestrator(settings, log))
    workflow = Parallel(
        name="fan",
        max_concurrency=2,
        tasks=[ParallelTask(name=f"t{i}", agent="worker", input=f"part {i}") for i in range(6)],
    )
    request = RunRequest(workflow=workflow, input="q")
    finished: set[str] = set()
    two_done = await progress_until(
        nc,
        settings,
        request.run_id,
        lambda p: p.kind == "step_finished" and (finished.add(p.step) or len(finished) >= 2),
    )
    await runs.submit(request)
    await asyncio.wait_for(two_done, 30)

    first.kill()
    first.wait(10)
    second = reap(spawn_orchestrator(settings, log))
    record = await runs.wait(request.run_id, timeout=40)
    assert stop_child(second) == 0, log.read_text()

    assert record.status == "completed", record.error
    assert all(calls[f"t{i}"] == 1 for i in range(6)), calls
    assert sorted(s.name for s in record.steps if s.status == "completed") == [
        f"t{i}" for i in range(6)
    ]


async def test_a_running_run_can_be_cancelled(
    coordinator: Coordinator,
    start_orchestrator: StartOrchestrator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    release = asyncio.Event()
    agent = Agent(name="worker", capabilities=["worker"])

    @agent.on_task
    async def stuck(task: Task, ctx: Context) -> str:
        await release.wait()
        return "late"

    await start_host(agent)
    await start_orchestrator()
    runs = RunClient(nc, settings.subjects)
    request = RunRequest(workflow=pipeline(2), input="q")
    started = await progress_until(nc, settings, request.run_id, lambda p: p.kind == "step_started")
    await runs.submit(request)
    await asyncio.wait_for(started, 20)

    await runs.cancel(request.run_id)
    record = await runs.wait(request.run_id, timeout=20)
    release.set()

    assert record.status == "cancelled"
    assert record.steps[0].status != "completed"


async def test_a_run_cancelled_before_it_starts_never_runs(
    start_orchestrator: StartOrchestrator,
    coordinator: Coordinator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    calls: Counter[str] = Counter()
    await start_host(counting("worker", calls))
    runs = RunClient(nc, settings.subjects)
    pending = await runs.submit(RunRequest(workflow=pipeline(1), input="q"))

    await runs.cancel(pending.run_id)
    await start_orchestrator()
    after = await runs.submit(RunRequest(workflow=pipeline(1), input="later"))
    await runs.wait(after.run_id, timeout=20)  # the queue moved past the cancelled run

    record = await runs.get(pending.run_id)
    assert record.status == "cancelled"
    assert calls["s0"] == 1  # only the later run's step ran
