"""Peer tools (another agent as a tool) against raw nats-py figures measured in the same run.

One embedded nats-server, one agent process (`python -m chorus agent run SPEC`, offline
model: it answers at once) and a coordinator process. This process is the calling agent: it
calls `PeerTool.call` one call at a time, as an agent loop does, with a ~1 KB input:

- a direct peer tool (`durable: false`: request-reply to the capability's queue group),
  against raw cross-process core request-reply to a tiny nats-py responder process;
- a durable peer tool (the default: a durable task through the coordinator), against the
  raw JetStream work-queue round trip (publish, pull fetch, ack, core reply);

and, to show what the tool itself adds, the client calls underneath (`run_task`,
`TaskQueue.run`). Targets: direct ≤ 1.5x raw request-reply p50, durable ≤ 2x the raw work
queue p50. Numbers are printed, never asserted.

    python -m bench.peer_tool            # about 20 s on 2 cores
    python -m bench.peer_tool --smoke    # a few hundred calls, a few seconds
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from bench.harness import cli
from bench.harness.baselines import INPUT, INSTRUCTIONS, request_reply, work_queue
from bench.harness.fleet import Fleet, print_warnings, running_fleet
from bench.harness.profile import metered
from bench.harness.stats import Call, Figure, sequential
from bench.harness.tables import markdown_table, versions_line
from chorus.client import ChorusClient, TaskQueue
from chorus.messages import Task, encode
from chorus.tools.base import ToolCallContext
from chorus.tools.peers import peer_tool

PREFIX = "benchpeer"
CAPABILITY = "bench"
TIMEOUT_S = 60.0
TARGET_DIRECT = 1.5  # peer tool (direct) p50 / raw request-reply p50
TARGET_DURABLE = 2.0  # peer tool (durable) p50 / raw work-queue p50

SPEC = f"""\
name: bencher
description: answers at once (offline model)
model: offline
instructions: Answer at once.
capabilities: [{CAPABILITY}]
max_concurrency: 16
"""


@dataclass(frozen=True)
class Sizes:
    raw: int
    direct: int
    durable: int
    warmup: int


DEFAULT = Sizes(raw=2000, direct=2000, durable=1000, warmup=200)
SMOKE = Sizes(raw=200, direct=200, durable=100, warmup=20)


async def raw_baselines(fleet: Fleet, sizes: Sizes) -> tuple[Figure, Figure]:
    body = encode(Task(input=INPUT, instructions=INSTRUCTIONS, task_id="t-0001"))
    rr, _ = await request_reply(
        fleet, body, warmup=sizes.warmup, sequential_n=sizes.raw, in_flight_n=sizes.warmup
    )
    wq, _ = await work_queue(fleet, body, warmup=sizes.warmup, sequential_n=sizes.raw)
    print(rr.line(), wq.line(), sep="\n", flush=True)
    return rr, wq


async def measure(fleet: Fleet, label: str, call: Call, n: int, warmup: int) -> Figure:
    for _ in range(warmup):
        await call()
    figure = Figure(label)
    async with metered(fleet) as figure.usage:
        figure.latencies = await sequential(call, n)
    print(figure.line(), flush=True)
    return figure


async def chorus_calls(fleet: Fleet, sizes: Sizes) -> dict[str, Figure]:
    client = ChorusClient(fleet.nc, fleet.subjects, timeout=TIMEOUT_S)
    queue = TaskQueue(fleet.nc, fleet.subjects)
    ctx = ToolCallContext(
        agent="caller", instance="caller-b1", task_id="bench", client=client, queue=queue
    )
    direct_tool = peer_tool({"capability": CAPABILITY, "durable": False, "timeout_s": TIMEOUT_S})
    durable_tool = peer_tool({"capability": CAPABILITY, "timeout_s": TIMEOUT_S})
    arguments = {"input": INPUT}

    async def direct() -> None:
        await direct_tool.call(arguments, ctx)

    async def durable() -> None:
        await durable_tool.call(arguments, ctx)

    async def run_task() -> None:
        await client.run_task(Task(input=INPUT), capability=CAPABILITY)

    async def queued() -> None:
        await queue.run(Task(input=INPUT), capability=CAPABILITY, timeout=TIMEOUT_S)

    return {
        "direct": await measure(fleet, "peer tool, direct", direct, sizes.direct, sizes.warmup),
        "run_task": await measure(
            fleet, "ChorusClient.run_task (under it)", run_task, sizes.direct, sizes.warmup
        ),
        "durable": await measure(fleet, "peer tool, durable", durable, sizes.durable, sizes.warmup),
        "queue": await measure(
            fleet, "TaskQueue.run (under it)", queued, sizes.durable, sizes.warmup
        ),
    }


def summary(rr: Figure, wq: Figure, ours: dict[str, Figure]) -> str:
    def row(label: str, raw: Figure, mine: Figure, target: float) -> list[str]:
        ratio = mine.p50 / raw.p50
        verdict = "met" if ratio <= target else "MISSED"
        return [
            label,
            f"{raw.p50:,.0f} us",
            f"{mine.p50:,.0f} us",
            f"{ratio:.2f}x",
            f"≤ {target}x",
            verdict,
        ]

    rows = [
        row("peer tool direct p50 vs raw request-reply p50", rr, ours["direct"], TARGET_DIRECT),
        row("peer tool durable p50 vs raw work-queue p50", wq, ours["durable"], TARGET_DURABLE),
    ]
    for name, under in (("direct", "run_task"), ("durable", "queue")):
        extra = ours[name].p50 - ours[under].p50
        rows.append(
            [f"peer tool {name}: added over the client call", "", "", f"{extra:+,.0f} us", "", ""]
        )
    return markdown_table(["measure", "raw", "peer tool", "ratio", "target", ""], rows)


async def main_async(args: argparse.Namespace, workdir: Path) -> None:
    sizes = SMOKE if args.smoke else DEFAULT
    async with running_fleet(workdir, PREFIX, self_role="caller", agent_role="agent") as fleet:
        print(versions_line(), flush=True)
        rr, wq = await raw_baselines(fleet, sizes)
        await fleet.start_coordinator()
        spec = workdir / "bencher.yaml"
        spec.write_text(SPEC)
        await fleet.add_agents(1, spec)
        ours = await chorus_calls(fleet, sizes)
    print_warnings(workdir)
    print("\n## Peer tools against raw nats-py (same run, one call at a time)\n")
    print(summary(rr, wq, ours), flush=True)


def main() -> int:
    parser = cli.parser("bench.peer_tool", __doc__)
    return cli.run(main_async, parser.parse_args(), "chorus-peer-tool-")


if __name__ == "__main__":
    raise SystemExit(main())
