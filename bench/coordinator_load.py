"""The coordinator's CPU while 1,000 instances heartbeat once a second.

One embedded nats-server, the coordinator as a real process (`python -m chorus coordinator`),
and this process as the simulator: it publishes a `Heartbeat` for each of 1,000 distinct
instances once a second (`interval_s=1.0`), spread evenly over the second (10 every 10 ms).
The instances are 10 agents of 100 replicas each, one capability per agent, as a large
deployment would have. Once the coordinator has registered every instance and the start-up
burst is over, the coordinator's CPU is read from /proc/<pid>/stat (utime + stime) over the
window, as % of one core; the target is < 5%. Also counted over the window: the registry KV
writes it causes (messages on `$KV.<prefix>-agents.>`), the heartbeats sent, health changes it
announced (there should be none), and the CPU of nats-server, of this simulator and of the
rest of the machine (noise).

    python -m bench.coordinator_load                  # 30 s window, about 45 s
    python -m bench.coordinator_load --smoke          # 5 s window, about 10 s
    python -m bench.coordinator_load --profile DIR    # then py-spy the coordinator for a window

`--profile` samples the coordinator after the measured window (so sampling does not count)
and prints where its CPU goes. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.harness import cli
from bench.harness.fleet import Child, running_fleet
from bench.harness.profile import dump_stacks, profiled, rss_mib
from bench.harness.tables import markdown_table
from chorus.messages import Heartbeat, Metrics, decode, encode
from chorus.nats.connection import connect
from chorus.subjects import Subjects

PREFIX = "load"
AGENTS = 10  # agent names; the instances are spread over them
INTERVAL_S = 1.0  # what each simulated instance says its heartbeat interval is
TICK_S = 0.01  # heartbeats go out in 100 small batches a second
TARGET_CPU_PCT = 5.0
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Sizes:
    instances: int
    window_s: float
    settle_s: float  # after every instance is registered, before measuring


DEFAULT = Sizes(instances=1000, window_s=30.0, settle_s=10.0)
SMOKE = Sizes(instances=1000, window_s=5.0, settle_s=3.0)


class Simulator:
    """Publishes one heartbeat per instance per INTERVAL_S, evenly spread, until stopped."""

    def __init__(self, nc: Client, subjects: Subjects, instances: int) -> None:
        self.nc = nc
        self.subjects = subjects
        self.instances = [f"sim{i % AGENTS}-{i:05d}" for i in range(instances)]
        self.started_at = time.time()
        self.sent = 0
        self.late_ticks = 0  # ticks that went out more than a tick late

    def heartbeat(self, instance: str) -> bytes:
        name = instance.split("-", 1)[0]
        beat = Heartbeat(
            instance=instance,
            name=name,
            capabilities=[f"{name}-work"],
            in_flight=0,
            max_concurrency=4,
            processed=0,
            failed=0,
            mean_latency_ms=0.0,
            interval_s=INTERVAL_S,
            started_at=self.started_at,
        )
        return encode(beat)

    async def run(self) -> None:
        per_tick = max(1, round(len(self.instances) * TICK_S / INTERVAL_S))
        loop = asyncio.get_running_loop()
        start, tick = loop.time(), 0
        while True:
            due = start + tick * TICK_S
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # the schedule is the point: a steady rate
            elif -delay > TICK_S:
                self.late_ticks += 1
            first = (tick * per_tick) % len(self.instances)
            for instance in self.instances[first : first + per_tick]:
                await self.nc.publish(self.subjects.heartbeat(instance), self.heartbeat(instance))
                self.sent += 1
            tick += 1


class Counter:
    """Counts messages on a subject (a core subscription), for a rate over a window."""

    def __init__(self) -> None:
        self.count = 0

    async def on_message(self, msg: Msg) -> None:
        self.count += 1


async def wait_registered(nc: Client, subjects: Subjects, want: int, coordinator: Child) -> None:
    """Until the coordinator's metrics count `want` healthy instances."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        coordinator.check_alive()
        try:
            reply = await nc.request(subjects.metrics, b"", timeout=10)
        except nats.errors.TimeoutError:
            print("a metrics request went unanswered for 10 s; asking again", file=sys.stderr)
            await dump_stacks(coordinator.pid)
            healthy = -1
        else:
            healthy = decode(reply.data, Metrics).healthy_agents
        if healthy >= want:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"coordinator registered {healthy}/{want} in {TIMEOUT_S}s")
        await asyncio.sleep(0.5)  # polling: registration is only visible in the metrics


async def run(sizes: Sizes, workdir: Path, profile: Path | None) -> None:
    async with running_fleet(workdir, PREFIX, self_role="simulator") as fleet:
        nc, subjects = fleet.nc, fleet.subjects
        # Heartbeats go out on their own connection: one nats-py connection publishing 1,000
        # messages a second while it also takes the registration burst (a KV write and a
        # status notice per instance) was at times cut off by the server as a slow consumer.
        simulator_nc = await connect(fleet.settings, "simulator")
        simulating: asyncio.Task[None] | None = None
        try:
            print(
                f"# nats-py {version('nats-py')}, msgspec {version('msgspec')}, Python "
                f"{platform.python_version()}, {os.cpu_count()} cpus; {sizes.instances} "
                f"instances x 1 heartbeat/{INTERVAL_S:g} s, window {sizes.window_s:g} s",
                flush=True,
            )
            coordinator = await fleet.start_coordinator()

            kv_writes, changes = Counter(), Counter()
            # The registry bucket's subjects (a wire name, only counted here).
            await nc.subscribe(f"$KV.{subjects.agents_bucket}.>", cb=kv_writes.on_message)
            await nc.subscribe(subjects.all_status, cb=changes.on_message)
            await nc.flush(timeout=5)

            simulator = Simulator(simulator_nc, subjects, sizes.instances)
            simulating = asyncio.create_task(simulator.run())
            started = time.perf_counter()
            await wait_registered(nc, subjects, sizes.instances, coordinator)
            registered_s = time.perf_counter() - started
            print(
                f"all {sizes.instances} instances registered after {registered_s:.1f} s",
                flush=True,
            )
            await asyncio.sleep(sizes.settle_s)  # the start-up burst (one KV put per instance)

            before = fleet.snapshot()
            counts = (kv_writes.count, changes.count, simulator.sent, simulator.late_ticks)
            window_start = time.perf_counter()
            await asyncio.sleep(sizes.window_s)  # the measurement is of a steady state
            wall = time.perf_counter() - window_start
            after = fleet.snapshot()
            writes = kv_writes.count - counts[0]
            announced = changes.count - counts[1]
            sent = simulator.sent - counts[2]
            late = simulator.late_ticks - counts[3]
            rss = rss_mib(coordinator.pid)

            cpu = {role: 100 * max(after[role] - before[role], 0) / wall for role in after}
            reply = await nc.request(subjects.metrics, b"", timeout=10)
            metrics = decode(reply.data, Metrics)

            if profile is not None:
                async with profiled(profile, "coordinator-load", {"coordinator": coordinator.pid}):
                    await asyncio.sleep(sizes.window_s)  # py-spy samples the steady state
        finally:
            if simulating is not None:
                simulating.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await simulating
            await simulator_nc.close()

    met = cpu["coordinator"] < TARGET_CPU_PCT
    rows = [
        [
            "coordinator CPU (% of one core)",
            f"{cpu['coordinator']:.1f}%",
            f"< {TARGET_CPU_PCT:g}%: {'met' if met else 'MISSED'}",
        ],
        ["heartbeats sent", f"{sent / wall:,.0f} /s", f"{late} ticks more than 10 ms late"],
        ["registry KV writes (`$KV.<prefix>-agents.>`)", f"{writes / wall:,.0f} /s", ""],
        ["health changes announced in the window", str(announced), "0 expected"],
        [
            "registry at the end (healthy / total)",
            f"{metrics.healthy_agents} / {metrics.total_agents}",
            "",
        ],
        ["coordinator VmRSS", f"{rss:.0f} MiB", ""],
        ["nats-server CPU", f"{cpu['nats-server']:.1f}%", ""],
        ["simulator CPU (this process)", f"{cpu['simulator']:.1f}%", ""],
        ["rest of the machine (noise)", f"{cpu['other']:.1f}%", "of 200%"],
    ]
    print(f"\n## Coordinator under {sizes.instances} heartbeating instances, {wall:.0f} s\n")
    print(markdown_table(["measure", "value", "note"], rows), flush=True)


async def main_async(args: argparse.Namespace, workdir: Path) -> None:
    sizes = SMOKE if args.smoke else DEFAULT
    sizes = Sizes(
        instances=args.instances or sizes.instances,
        window_s=args.seconds or sizes.window_s,
        settle_s=sizes.settle_s,
    )
    await run(sizes, workdir, args.profile)


def main() -> int:
    parser = cli.parser(
        "bench.coordinator_load", __doc__, profile="py-spy the coordinator afterwards; here"
    )
    parser.add_argument("--instances", type=int, help="simulated instances (default 1000)")
    parser.add_argument("--seconds", type=float, help="the measured window")
    return cli.run(main_async, parser.parse_args(), "chorus-coordinator-load-")


if __name__ == "__main__":
    raise SystemExit(main())
