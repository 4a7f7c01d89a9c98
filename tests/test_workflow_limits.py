"""A run whose record outgrows the server's max_payload fails, saying why, instead of looping."""

from __future__ import annotations

from nats.aio.client import Client

from chorus.agent import Agent, Context
from chorus.client import ChorusClient
from chorus.config import Settings
from chorus.messages import Task
from chorus.specs.workflow import Parallel, ParallelTask
from chorus.workflows.engine import run_workflow
from tests.conftest import StartHost


async def test_a_run_record_past_max_payload_fails_with_the_reason(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    agent = Agent(name="verbose", capabilities=["verbose"], max_concurrency=8)

    @agent.on_task
    async def ramble(task: Task, ctx: Context) -> str:
        return "x" * 300_000  # four of these outgrow a 1 MiB record

    await start_host(agent)
    workflow = Parallel(
        name="big", tasks=[ParallelTask(name=f"t{i}", agent="verbose") for i in range(6)]
    )

    record = await run_workflow(ChorusClient(nc, settings.subjects), workflow, "go")

    assert record.status == "failed"
    assert "max_payload" in record.error
