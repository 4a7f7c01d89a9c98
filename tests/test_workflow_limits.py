"""A run whose record outgrows the server's max_payload fails, saying why, instead of looping."""

from __future__ import annotations

from collections.abc import Awaitable

from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.agent import Agent, Context
from chorus.client import ChorusClient
from chorus.client.runstore import KvRunStore
from chorus.config import Settings
from chorus.messages import RunRecord, Task
from chorus.specs.workflow import Parallel, ParallelTask
from chorus.workflows.engine import run_workflow
from tests.helpers import StartHost


async def test_a_run_whose_output_outgrows_max_payload_completes_with_every_step_kept(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    agent = Agent(name="verbose", capabilities=["verbose"], max_concurrency=8)

    @agent.on_task
    async def ramble(task: Task, ctx: Context) -> str:
        return "x" * 300_000  # four of these outgrow a 1 MiB message

    await start_host(agent)
    workflow = Parallel(
        name="big", tasks=[ParallelTask(name=f"t{i}", agent="verbose") for i in range(6)]
    )

    record = await run_workflow(ChorusClient(nc, settings.subjects), workflow, "go")
    stored = await (await KvRunStore.open(nc.jetstream(), settings.subjects)).load(record.run_id)

    assert record.status == "completed"
    assert stored is not None and stored.status == "completed"
    assert [len(s.output) for s in stored.steps] == [300_000] * 6
    assert "max_payload" in stored.output and len(stored.output) < 3_000


async def _bytes_written_by(run: Awaitable[RunRecord], nc: Client, settings: Settings) -> int:
    """Every byte stored in the runs bucket while `run` goes (heads, workflow, steps)."""
    written = 0

    async def count(msg: Msg) -> None:
        nonlocal written
        written += len(msg.data)

    subscription = await nc.subscribe(f"$KV.{settings.subjects.runs_bucket}.>", cb=count)
    try:
        await run
        await nc.flush(timeout=5)
    finally:
        await subscription.unsubscribe()
    return written


async def test_a_parallel_run_writes_bytes_in_proportion_to_its_tasks(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    await start_host(Agent(name="quick", capabilities=["quick"], max_concurrency=32))
    client = ChorusClient(nc, settings.subjects)

    def parallel(n: int) -> Parallel:
        tasks = [ParallelTask(name=f"t{i}", agent="quick") for i in range(n)]
        return Parallel(name=f"wide{n}", tasks=tasks, max_concurrency=32)

    small = await _bytes_written_by(run_workflow(client, parallel(50), "go"), nc, settings)
    large = await _bytes_written_by(run_workflow(client, parallel(400), "go"), nc, settings)

    # 8x the tasks: O(n) writes 8x the bytes (plus the workflow, 8x longer too); a record
    # saved whole at every step would write ~64x.
    assert large / small < 12, (small, large)


async def test_a_large_run_loads_with_every_step_every_time(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    await start_host(Agent(name="quick", capabilities=["quick"], max_concurrency=32))
    tasks = [ParallelTask(name=f"t{i}", agent="quick") for i in range(300)]
    workflow = Parallel(name="wide", tasks=tasks, max_concurrency=32)
    record = await run_workflow(ChorusClient(nc, settings.subjects), workflow, "go")
    store = await KvRunStore.open(nc.jetstream(), settings.subjects)

    # nats-py's KV watch sometimes reports a snapshot of many keys as empty (it trusts a
    # push consumer's pending count): the store must never.
    counts = [len((await store.fresh().load(record.run_id)).steps) for _ in range(20)]  # type: ignore[union-attr]

    assert counts == [300] * 20
