"""Durable tasks on one nats-server (1 replica) against a three-node cluster (3 replicas),
measured in the same run, as a ratio; then, on the cluster, the leader of the dispatch
stream is SIGKILLed: how late the next durable task is, and how long the node takes to rejoin.

For each setup: the server or the cluster (`chorus.nats.cluster.NatsCluster`, as `chorus up
--cluster 3` starts it), the coordinator and N agents as real processes (offline model: an
agent answers at once), the requester in this process, connected to every node. Then
`TaskQueue.run` one at a time (p50, p99) and with 100 in flight (tasks/s). With three
replicas every stream and bucket write — the queued task, its claim, its outcome — is
committed by two of the three servers before it is acknowledged. Numbers are printed, never
asserted.

    python -m bench.cluster             # 300 sequential + 2,000 in flight per setup, 4 agents
    python -m bench.cluster --smoke     # 30 + 200, 2 agents, about 15 s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bench.harness import cli
from bench.harness.fleet import Fleet, child_env, print_warnings
from bench.harness.stats import IN_FLIGHT, Figure, in_flight, sequential
from bench.harness.tables import markdown_table, versions_line
from bench.routing import CAPABILITY, DURABLE_TIMEOUT_S, SPEC
from chorus.client.durable import TaskQueue
from chorus.config import Settings
from chorus.messages import Task
from chorus.nats.cluster import NatsCluster
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer

PREFIX = "bench"


@dataclass(frozen=True)
class Sizes:
    agents: int
    warmup: int
    sequential: int
    in_flight: int


DEFAULT = Sizes(agents=4, warmup=50, sequential=300, in_flight=2000)
SMOKE = Sizes(agents=2, warmup=10, sequential=30, in_flight=200)


@dataclass
class ClusterFleet(Fleet):
    """A Fleet whose services reach every node, with CHORUS_REPLICAS set."""

    nodes: NatsCluster | None = None
    replicas: int = 1

    @property
    def url(self) -> str:
        return self.nodes.url if self.nodes else self.server.url

    @property
    def env(self) -> dict[str, str]:
        return child_env(self.url, self.settings.prefix, {"CHORUS_REPLICAS": str(self.replicas)})


@contextlib.asynccontextmanager
async def running(workdir: Path, size: int) -> AsyncIterator[ClusterFleet]:
    """One nats-server, or a cluster of `size` (stores and logs in `workdir`), and a
    connection to every node."""
    nodes = NatsCluster(workdir / "cluster", size, log_dir=workdir) if size > 1 else None
    servers = (
        nodes.nodes
        if nodes
        else {"n1": NatsServer(workdir / "jetstream", log_file=workdir / "nats-server.log")}
    )
    if nodes:
        nodes.start()
    else:
        servers["n1"].start()
    try:
        url = nodes.url if nodes else servers["n1"].url
        settings = Settings(nats_url=url, prefix=PREFIX, replicas=size)
        nc = await connect(settings, "bench")
        first = servers["n1"]
        fleet = ClusterFleet(first, nc, settings, workdir, "agent", nodes=nodes, replicas=size)
        fleet.add("client", os.getpid())
        for name, node in servers.items():
            assert node.pid is not None
            fleet.add(f"nats-server {name}", node.pid)
        try:
            yield fleet
        except BaseException:
            print_warnings(workdir)
            raise
        finally:
            await fleet.stop()
            await nc.close()
    finally:
        for node in servers.values():
            node.stop()


async def measure(workdir: Path, size: int, sizes: Sizes) -> tuple[Figure, Figure]:
    label = f"{size} node{'s' if size > 1 else ''}, R{size}"
    async with running(workdir, size) as fleet:
        await fleet.start_coordinator()
        spec = workdir / "bencher.yaml"
        spec.write_text(SPEC)
        await fleet.add_agents(sizes.agents, spec)
        queue = TaskQueue(fleet.nc, fleet.subjects)

        async def durable() -> None:
            await queue.run(
                Task(input="bench", instructions="Answer at once."),
                capability=CAPABILITY,
                timeout=DURABLE_TIMEOUT_S,
            )

        for _ in range(sizes.warmup):
            await durable()
        seq = Figure(f"durable, {label}, sequential")
        seq.latencies = await sequential(durable, sizes.sequential)
        print(seq.line(), flush=True)
        pipe = Figure(f"durable, {label}, {IN_FLIGHT} in flight")
        await in_flight(durable, sizes.in_flight, pipe)
        print(pipe.line(), flush=True)
        if fleet.nodes is not None:
            await failover(fleet, durable)
        await queue.close()
        return seq, pipe


async def failover(fleet: ClusterFleet, durable: Callable[[], Awaitable[None]]) -> None:
    """SIGKILL the leader of the dispatch stream, then: how long the next durable task takes
    (a new leader is elected meanwhile), and how long the node takes to rejoin."""
    assert fleet.nodes is not None
    info = await fleet.nc.jetstream().stream_info(fleet.subjects.dispatch_stream)
    leader = info.cluster.leader if info.cluster else None
    assert leader is not None
    fleet.nodes.kill(leader)
    killed = time.perf_counter()
    await durable()
    after_kill = time.perf_counter() - killed
    started = time.perf_counter()
    await asyncio.to_thread(fleet.nodes.restart, leader)
    rejoined = time.perf_counter() - started
    print(
        f"failover: dispatch-stream leader {leader} killed; the next durable task took "
        f"{after_kill:.2f} s; the node restarted and rejoined in {rejoined:.2f} s",
        flush=True,
    )


async def main_async(args: argparse.Namespace, workdir: Path) -> None:
    sizes = SMOKE if args.smoke else DEFAULT
    print(versions_line(), f"# {sizes.agents} agents, coordinator, requester: processes", sep="\n")
    one_seq, one_pipe = await measure(workdir / "single", 1, sizes)
    three_seq, three_pipe = await measure(workdir / "cluster", 3, sizes)
    rows = [
        [
            "durable tasks/s, 100 in flight",
            f"{one_pipe.rate or 0:,.0f}",
            f"{three_pipe.rate or 0:,.0f}",
            f"{(three_pipe.rate or 0) / (one_pipe.rate or 1):.2f}",
        ],
        [
            "durable p50, sequential (us)",
            f"{one_seq.p50:,.0f}",
            f"{three_seq.p50:,.0f}",
            f"{three_seq.p50 / one_seq.p50:.2f}",
        ],
        [
            "durable p99, sequential (us)",
            f"{one_seq.p99:,.0f}",
            f"{three_seq.p99:,.0f}",
            f"{three_seq.p99 / one_seq.p99:.2f}",
        ],
    ]
    print("\n## One server (R1) against a three-node cluster (R3), same run\n")
    print(markdown_table(["measure", "1 node, R1", "3 nodes, R3", "R3 / R1"], rows), flush=True)


def main() -> int:
    parser = cli.parser("bench.cluster", __doc__)
    return cli.run(main_async, parser.parse_args(), "chorus-cluster-")


if __name__ == "__main__":
    raise SystemExit(main())
