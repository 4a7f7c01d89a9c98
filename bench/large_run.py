"""A parallel run of many tasks (10,000 by default): that it completes, how long it takes, and
how many bytes its run storage writes (O(n): about 1 KB a task, whatever n is).

    python -m bench.large_run [--tasks N] [--smoke]

One process: an embedded nats-server, one agent instance (offline model) and the workflow
engine on the NATS implementations (direct request-reply tasks). Printed, not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from nats.aio.msg import Msg

from chorus.agent import Agent
from chorus.agent.host import AgentHost
from chorus.client import ChorusClient
from chorus.config import Settings
from chorus.llm.offline import OfflineModel
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer
from chorus.specs.workflow import Parallel, ParallelTask
from chorus.workflows.engine import run_workflow


async def measure(tasks: int, store_dir: Path) -> None:
    server = NatsServer(store_dir).start()
    try:
        settings = Settings(nats_url=server.url, prefix="bench")
        host = AgentHost(
            Agent(name="wide", capabilities=["wide"], max_concurrency=64),
            settings,
            model=OfflineModel(),
        )
        await host.start()
        nc = await connect(settings, "bench-large-run")
        written = 0
        keys = 0

        async def count(msg: Msg) -> None:
            nonlocal written, keys
            written += len(msg.data)
            keys += 1

        await nc.subscribe(f"$KV.{settings.subjects.runs_bucket}.>", cb=count)
        workflow = Parallel(
            name="wide",
            tasks=[ParallelTask(name=f"t{i}", agent="wide") for i in range(tasks)],
            max_concurrency=64,
        )
        started = time.perf_counter()
        record = await run_workflow(ChorusClient(nc, settings.subjects), workflow, "go")
        wall = time.perf_counter() - started
        await nc.flush(timeout=10)
        done = sum(s.status == "completed" for s in record.steps)
        print(f"parallel run of {tasks} tasks: {record.status}, {done} completed")
        print(f"wall {wall:.1f} s, {tasks / wall:.0f} tasks/s")
        print(
            f"run storage: {written / 2**20:.1f} MiB in {keys} writes, "
            f"{written / tasks:.0f} bytes a task"
        )
        await nc.close()
        await host.stop()
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--smoke", action="store_true", help="200 tasks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chorus-large-run-") as where:
        asyncio.run(measure(200 if args.smoke else args.tasks, Path(where)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
