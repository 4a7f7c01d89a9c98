"""Routed tasks through Chorus, against raw nats-py figures measured in the same run.

One embedded nats-server. Agents (`python -m chorus agent run SPEC --instance X`, offline
model: it answers at once) and the coordinator (`python -m chorus coordinator`) run as real
processes, as in production; the requester is this process. Measured, in this order:

- raw baselines (`bench.harness.baselines`): cross-process core request-reply to a tiny
  nats-py responder process (sequential p50/p99, req/s with 100 in flight) and a JetStream
  work-queue round trip (publish, pull fetch, ack, core reply; sequential p50/p99 and req/s
  with 100 in flight, the worker in this process);
- the direct path, `ChorusClient.run_task(task, capability=...)`: core request-reply to the
  capability's queue group;
- the durable routed path, `TaskQueue.run(task, capability=...)`: a JetStream work queue;
  the coordinator fetches, picks an instance, sends it the task by request-reply, records
  the outcome in KV and announces it;

each with 1 and then 4 agent processes. An agent takes up to 128 tasks at once, more than
the 100 in flight, so an agent's capacity never limits throughput. The payload is a ~1 KB
task. During each phase the CPU of every process is read from /proc/<pid>/stat (% of one
core; `other` is the rest of the machine, i.e. noise) and the server's message counters from
its /varz, per request. A durable request slower than 5 s is reported as a stall (it waited
for the coordinator's claim timeout). Then the ratios against raw nats-py, the cost per
request, and a traced round (`bench.routing_trace`: `--trace N` requests of each kind, one at
a time, under a tap process that timestamps every message on the wire; where the latency
goes). Numbers are printed, never asserted.

    python -m bench.routing                    # about 80 s on 2 cores (+30 s per stall)
    python -m bench.routing --smoke            # a few hundred requests, about 10 s
    python -m bench.routing --trace 0          # without the traced round
    python -m bench.routing --profile DIR      # also py-spy the 4-agent throughput phases

`--profile` needs `pip install py-spy`; sampling perturbs the figures, so take figures from a
run without it.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.harness import cli
from bench.harness.baselines import INPUT, INSTRUCTIONS, request_reply, work_queue
from bench.harness.fleet import TIMEOUT_S, Fleet, print_warnings, running_fleet
from bench.harness.profile import metered, profiled
from bench.harness.stats import IN_FLIGHT, Figure, in_flight, sequential
from bench.harness.tables import markdown_table, versions_line
from bench.routing_trace import trace
from chorus.client import ChorusClient
from chorus.client.durable import TaskQueue
from chorus.messages import Metrics, Task, decode, encode

PREFIX = "bench"
CAPABILITY = "bench"
MAX_CONCURRENCY = 128  # more than IN_FLIGHT: one agent alone never makes a task wait
# Longer than the coordinator's claim timeout (30 s), so a task that is only redelivered
# after its claim lapses is counted as a stall rather than ending the run.
DURABLE_TIMEOUT_S = 120.0

# Targets from the coordinator issue.
TARGET_LATENCY_RATIO = 1.5  # Chorus p50 / matching raw p50
TARGET_THROUGHPUT_SHARE = 0.5  # Chorus req/s with 4 agents / raw req/s, 100 in flight

SPEC = f"""\
name: bencher
description: answers at once (offline model)
model: offline
instructions: Answer at once.
capabilities: [{CAPABILITY}]
max_concurrency: {MAX_CONCURRENCY}
"""


@dataclass(frozen=True)
class Sizes:
    raw_seq: int
    raw_pipe: int
    wq_seq: int
    wq_pipe: int
    direct_seq: int
    direct_pipe: int
    durable_seq: int
    durable_pipe: int
    warmup: int
    traced: int


DEFAULT = Sizes(
    raw_seq=3000,
    raw_pipe=20000,
    wq_seq=2000,
    wq_pipe=5000,
    direct_seq=2000,
    direct_pipe=10000,
    durable_seq=1000,
    durable_pipe=3000,
    warmup=200,
    traced=300,
)
SMOKE = Sizes(
    raw_seq=300,
    raw_pipe=2000,
    wq_seq=300,
    wq_pipe=1000,
    direct_seq=300,
    direct_pipe=1000,
    durable_seq=200,
    durable_pipe=300,
    warmup=30,
    traced=50,
)


async def raw_baselines(fleet: Fleet, sizes: Sizes) -> dict[str, Figure]:
    """Raw request-reply and work queue, each printed as it is measured."""
    body = encode(Task(input=INPUT, instructions=INSTRUCTIONS, task_id="t-0001"))
    raw: dict[str, Figure] = {}
    raw["rr_seq"], raw["rr_pipe"] = await request_reply(
        fleet, body, warmup=sizes.warmup, sequential_n=sizes.raw_seq, in_flight_n=sizes.raw_pipe
    )
    print(raw["rr_seq"].line(), raw["rr_pipe"].line(), sep="\n", flush=True)
    wq_seq, wq_pipe = await work_queue(
        fleet, body, warmup=sizes.warmup, sequential_n=sizes.wq_seq, in_flight_n=sizes.wq_pipe
    )
    assert wq_pipe is not None
    raw["wq_seq"], raw["wq_pipe"] = wq_seq, wq_pipe
    print(wq_seq.line(), wq_pipe.line(), sep="\n", flush=True)
    return raw


async def chorus_paths(
    fleet: Fleet, sizes: Sizes, agents: int, profile: Path | None
) -> dict[str, Figure]:
    client = ChorusClient(fleet.nc, fleet.subjects, timeout=TIMEOUT_S)
    queue = TaskQueue(fleet.nc, fleet.subjects)
    answered: Counter[str] = Counter()

    def task() -> Task:
        return Task(input=INPUT, instructions=INSTRUCTIONS)

    async def direct() -> None:
        result = await client.run_task(task(), capability=CAPABILITY)
        answered[result.instance] += 1

    async def durable() -> None:
        result = await queue.run(task(), capability=CAPABILITY, timeout=DURABLE_TIMEOUT_S)
        answered[result.instance] += 1

    def spies(phase: str) -> dict[str, int]:
        targets = {"client": os.getpid(), "agent": fleet.pid("agent")}
        if phase == "durable":
            targets["coordinator"] = fleet.pid("coordinator")
        return targets

    figures: dict[str, Figure] = {}
    label = f"{agents} agent{'s' if agents > 1 else ''}"
    for name, call, seq_n, pipe_n in (
        ("direct", direct, sizes.direct_seq, sizes.direct_pipe),
        ("durable", durable, sizes.durable_seq, sizes.durable_pipe),
    ):
        for _ in range(sizes.warmup):
            await call()
        answered.clear()
        seq = Figure(f"chorus {name}, {label}, sequential")
        async with metered(fleet) as seq.usage:
            seq.latencies = await sequential(call, seq_n)
        print(seq.line(), flush=True)
        answered.clear()
        pipe = Figure(f"chorus {name}, {label}, {IN_FLIGHT} in flight")
        spied = profile if agents > 1 else None
        async with (
            profiled(spied, f"{name}-{agents}agents", spies(name)),
            metered(fleet) as pipe.usage,
        ):
            await in_flight(call, pipe_n, pipe)
        pipe.spread = Counter(answered)
        print(pipe.line(), flush=True)
        figures[f"{name}_seq"] = seq
        figures[f"{name}_pipe"] = pipe
    return figures


def ratio_row(
    label: str, raw: float, ones: float, fours: float, target: str, unit: str
) -> list[str]:
    def cell(value: float) -> str:
        return f"{value:,.0f} {unit}"

    r1, r4 = ones / raw, fours / raw
    if unit == "req/s":
        met = r4 >= TARGET_THROUGHPUT_SHARE
        shown = [f"{r1:.0%}", f"{r4:.0%}"]
    else:
        met = max(r1, r4) <= TARGET_LATENCY_RATIO
        shown = [f"{r1:.2f}x", f"{r4:.2f}x"]
    verdict = "" if not target else "met" if met else "MISSED"
    return [label, cell(raw), cell(ones), shown[0], cell(fours), shown[1], target or "—", verdict]


def summary(raw: dict[str, Figure], one: dict[str, Figure], four: dict[str, Figure]) -> str:
    rr, rr_pipe, wq = raw["rr_seq"], raw["rr_pipe"], raw["wq_seq"]
    assert rr_pipe.rate is not None
    rows = [
        ratio_row(
            "direct `run_task` p50 vs raw request-reply p50",
            rr.p50,
            one["direct_seq"].p50,
            four["direct_seq"].p50,
            "≤ 1.5x",
            "us",
        ),
        ratio_row(
            "direct `run_task` p99 vs raw request-reply p99",
            rr.p99,
            one["direct_seq"].p99,
            four["direct_seq"].p99,
            "",
            "us",
        ),
        ratio_row(
            "durable `TaskQueue.run` p50 vs raw work-queue p50",
            wq.p50,
            one["durable_seq"].p50,
            four["durable_seq"].p50,
            "≤ 1.5x",
            "us",
        ),
        ratio_row(
            "durable `TaskQueue.run` p99 vs raw work-queue p99",
            wq.p99,
            one["durable_seq"].p99,
            four["durable_seq"].p99,
            "",
            "us",
        ),
    ]
    for name in ("direct", "durable"):
        ones, fours = one[f"{name}_pipe"].rate, four[f"{name}_pipe"].rate
        assert ones is not None and fours is not None
        rows.append(
            ratio_row(
                f"{name}, {IN_FLIGHT} in flight, vs raw request-reply {IN_FLIGHT} in flight",
                rr_pipe.rate,
                ones,
                fours,
                "≥ 50% (4 agents)",
                "req/s",
            )
        )
    # Not a target: the durable path against the raw path of its own kind.
    wq_pipe, ones, fours = raw["wq_pipe"].rate, one["durable_pipe"].rate, four["durable_pipe"].rate
    assert wq_pipe is not None and ones is not None and fours is not None
    rows.append(
        ratio_row(
            f"durable, {IN_FLIGHT} in flight, vs raw work queue {IN_FLIGHT} in flight",
            wq_pipe,
            ones,
            fours,
            "",
            "req/s",
        )
    )
    header = ["measure", "raw", "1 agent", "ratio", "4 agents", "ratio", "target", ""]
    return markdown_table(header, rows)


def cost_table(figures: list[Figure]) -> str:
    roles = ["client", "nats-server", "coordinator", "agent", "responder", "other"]
    present = [r for r in roles if any(r in f.cpu for f in figures)]
    rows = []
    for f in figures:
        msgs = f.msgs_per_request
        rows.append(
            [
                f.label,
                f"{f.cpu_us_per_request:.0f}" if f.cpu_us_per_request is not None else "",
                f"{msgs[0]:.1f} / {msgs[1]:.1f}" if msgs else "",
                *(f"{f.cpu[r]:.0f}%" if r in f.cpu else "" for r in present),
            ]
        )
    header = ["phase", "CPU us/request", "server msgs in / out per request"]
    return markdown_table(header + [f"{r} CPU" for r in present], rows)


async def main_async(args: argparse.Namespace, workdir: Path) -> None:
    sizes = SMOKE if args.smoke else DEFAULT
    traced_n = args.trace if args.trace is not None else sizes.traced
    async with running_fleet(workdir, PREFIX, self_role="client", agent_role="agent") as fleet:
        print(versions_line(), flush=True)
        raw = await raw_baselines(fleet, sizes)
        await fleet.start_coordinator()
        spec = workdir / "bencher.yaml"
        spec.write_text(SPEC)
        await fleet.add_agents(1, spec)
        one = await chorus_paths(fleet, sizes, 1, args.profile)
        await fleet.add_agents(3, spec)
        four = await chorus_paths(fleet, sizes, 4, args.profile)
        traced = await trace(fleet, traced_n, CAPABILITY, DURABLE_TIMEOUT_S) if traced_n else []
        metrics = await fleet.nc.request(fleet.subjects.metrics, b"", timeout=5)
        counts = decode(metrics.data, Metrics)
        print(
            f"\ncoordinator: {counts.completed_tasks} completed, {counts.failed_tasks} failed, "
            f"{counts.retried_tasks} retried",
            flush=True,
        )
    print_warnings(workdir)
    print("\n## Ratios against raw nats-py (same run)\n")
    print(summary(raw, one, four))
    print("\n## Cost per request (CPU of every process of the run; messages through the server)\n")
    print(cost_table([*raw.values(), *one.values(), *four.values()]), flush=True)
    if traced:
        print("\n## Where a request's time goes (4 agents; wire times seen by a tap process)\n")
        for kind in traced:
            print(kind.table() + "\n", flush=True)


def main() -> int:
    parser = cli.parser(
        "bench.routing",
        __doc__,
        trace="requests of each kind in the traced round (0: none; default 300, smoke 50)",
        profile="py-spy the 4-agent throughput phases; the profiles go here",
    )
    return cli.run(main_async, parser.parse_args(), "chorus-routing-")


if __name__ == "__main__":
    raise SystemExit(main())
