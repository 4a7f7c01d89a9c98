"""Output processors resolve only against the registry a service was started with: a workflow
off the wire cannot import code, and whatever a processor raises fails its step, not the
service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest
from nats.aio.client import Client

from chorus.agent import Agent, Context
from chorus.cli.main import build_parser
from chorus.client import ChorusClient
from chorus.client.runs import RunClient
from chorus.client.runstore import KvRunStore
from chorus.config import Settings
from chorus.errors import ConfigError
from chorus.messages import Result, RunRecord, RunRequest, StepRecord, Task
from chorus.workflows import Pipeline, Step
from chorus.workflows.engine import Engine, new_record, run_workflow
from chorus.workflows.processors import load_processors
from tests.helpers import Reap, StartHost, StartOrchestrator, child_env, stop_child
from tests.test_gateway import running_gateway


def shout(step: StepRecord) -> str:
    return step.output.upper()


def bail(step: StepRecord) -> NoReturn:
    sys.exit(3)


# What `chorus orchestrator --processors tests.test_processor_registry` registers.
PROCESSORS = {"shout": shout, "bail": bail}


def echo() -> Agent:
    agent = Agent(name="worker")

    @agent.on_task
    async def answer(task: Task, ctx: Context) -> str:
        return f"worked on {task.input}"

    return agent


def pipeline(processor: str = "") -> Pipeline:
    return Pipeline(name="p", steps=[Step(agent="worker", processor=processor)])


async def submit(runs: RunClient, workflow: Pipeline) -> RunRecord:
    pending = await runs.submit(RunRequest(workflow=workflow, input="q"))
    return await runs.wait(pending.run_id, timeout=20)


@pytest.mark.parametrize("name", ["sys:exit", "os:_exit", "os:abort", "builtins:exit"])
async def test_a_module_function_from_the_wire_fails_the_run_and_the_orchestrator_serves_on(
    name: str,
    start_orchestrator: StartOrchestrator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    await start_host(echo())
    await start_orchestrator(durable_tasks=False)
    runs = RunClient(nc, settings.subjects)

    refused = await submit(runs, pipeline(name))
    after = await submit(runs, pipeline())

    assert refused.status == "failed"
    assert f"step 1 (worker) names the output processor {name!r}" in refused.error
    assert "not registered with this orchestrator (registered: none)" in refused.error
    assert refused.steps == []  # refused before anything was sent
    assert after.status == "completed", after.error
    assert after.output == "worked on q"


async def test_sys_exit_posted_to_the_gateway_fails_the_run_and_the_orchestrator_serves_on(
    start_orchestrator: StartOrchestrator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    await start_host(echo())
    await start_orchestrator(durable_tasks=False)
    workflow = {"type": "pipeline", "name": "p", "steps": [{"agent": "worker"}]}
    exiting = {**workflow, "steps": [{"agent": "worker", "processor": "sys:exit"}]}

    async with running_gateway(nc, settings) as http:
        refused = await http.post("/api/execute", json={"workflow": exiting, "input": "q"})
        after = await http.post("/api/execute", json={"workflow": workflow, "input": "q"})

    assert refused.status_code == 200
    assert refused.json()["status"] == "failed"
    assert "'sys:exit', which is not registered" in refused.json()["error"]
    assert after.json()["status"] == "completed"


async def test_the_orchestrator_process_survives_sys_exit_and_runs_its_processors_modules(
    start_host: StartHost, nc: Client, settings: Settings, tmp_path: Path, reap: Reap
) -> None:
    await start_host(echo())
    log = tmp_path / "orchestrator.log"
    with log.open("ab") as sink:
        command = ["orchestrator", "--direct", "--processors", "tests.test_processor_registry"]
        child = reap(
            subprocess.Popen(
                [sys.executable, "-m", "chorus", *command],
                env=child_env(settings),
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        )
    runs = RunClient(nc, settings.subjects)

    refused = await submit(runs, pipeline("sys:exit"))
    bailed = await submit(runs, pipeline("bail"))
    shouted = await submit(runs, pipeline("shout"))

    assert child.poll() is None, log.read_text()
    assert stop_child(child) == 0, log.read_text()
    assert refused.status == "failed" and "(registered: bail, shout)" in refused.error
    assert bailed.status == "failed" and "raised SystemExit: 3" in bailed.error
    assert shouted.output == "WORKED ON Q", shouted.error


async def test_a_processor_from_a_processors_module_runs_in_the_orchestrator(
    start_orchestrator: StartOrchestrator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    await start_host(echo())
    processors = load_processors(["tests.test_processor_registry"])
    await start_orchestrator(durable_tasks=False, processors=processors)
    runs = RunClient(nc, settings.subjects)

    record = await submit(runs, pipeline("shout"))
    unknown = await submit(runs, pipeline("whisper"))

    assert record.status == "completed", record.error
    assert record.output == "WORKED ON Q"
    assert unknown.status == "failed"
    assert "'whisper'" in unknown.error and "(registered: bail, shout)" in unknown.error


async def test_a_processor_calling_sys_exit_fails_its_step_and_the_orchestrator_serves_on(
    start_orchestrator: StartOrchestrator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    await start_host(echo())
    await start_orchestrator(durable_tasks=False, processors=PROCESSORS)
    runs = RunClient(nc, settings.subjects)

    failed = await submit(runs, pipeline("bail"))
    after = await submit(runs, pipeline("shout"))

    assert failed.status == "failed"
    assert failed.steps[0].status == "failed"
    assert failed.steps[0].error == "output processor 'bail' raised SystemExit: 3"
    assert failed.error == "step 1 (worker) failed: output processor 'bail' raised SystemExit: 3"
    assert after.status == "completed", after.error


def raise_keyboard_interrupt(step: StepRecord) -> NoReturn:
    raise KeyboardInterrupt


def raise_generator_exit(step: StepRecord) -> NoReturn:
    raise GeneratorExit("closed")


async def exit_later(step: StepRecord) -> NoReturn:
    raise SystemExit("from a coroutine")


@pytest.mark.parametrize(
    ("processor", "raised"),
    [
        (raise_keyboard_interrupt, "KeyboardInterrupt"),
        (raise_generator_exit, "GeneratorExit: closed"),
        (exit_later, "SystemExit: from a coroutine"),
    ],
)
async def test_any_base_exception_from_a_processor_is_a_failed_step(
    processor: Any, raised: str, start_host: StartHost, client: ChorusClient
) -> None:
    await start_host(echo())

    record = await run_workflow(client, pipeline("p"), "q", processors={"p": processor})

    assert record.status == "failed"
    assert record.steps[0].code == "task_failed"
    assert f"output processor 'p' raised {raised}" in record.steps[0].error


async def test_the_python_api_resolves_processors_only_from_the_mapping_given(
    client: ChorusClient,
) -> None:
    record = await run_workflow(client, pipeline("sys:exit"), "q", processors={"shout": shout})

    assert record.status == "failed"
    assert "'sys:exit', which is not registered" in record.error
    assert "(registered: shout)" in record.error


def test_a_processor_module_without_a_registry_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="has no PROCESSORS mapping"):
        load_processors(["tests.conftest"])
    with pytest.raises(ConfigError, match="cannot import processor module 'no_such_module_x'"):
        load_processors(["no_such_module_x"])


def test_the_same_processor_name_from_two_modules_is_refused() -> None:
    with pytest.raises(ConfigError, match="registered by both"):
        load_processors(["tests.test_processor_registry", "tests.test_processor_registry"])


def test_the_orchestrator_command_takes_repeatable_processor_modules() -> None:
    args = build_parser().parse_args(
        ["orchestrator", "--processors", "a.one", "--processors", "b.two"]
    )

    assert args.processors == ["a.one", "b.two"]


class ExitingRunner:
    async def run(self, task: Task) -> Result:
        raise SystemExit(f"runner gave up on {task.step}")


async def test_a_base_exception_under_a_run_fails_the_run_not_the_engine(
    nc: Client, settings: Settings
) -> None:
    store = await KvRunStore.open(nc.jetstream(), settings.subjects)
    engine = Engine(ExitingRunner(), store)

    record = await engine.run(new_record(pipeline(), "q"))

    assert record.status == "failed"
    assert record.error == "internal error: SystemExit: runner gave up on worker"
    assert (await store.load(record.run_id)) is not None
