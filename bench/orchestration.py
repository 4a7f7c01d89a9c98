"""Orchestration overhead: workflow runs through the orchestrator, against raw nats-py figures.

One embedded nats-server; agents (`python -m chorus agent run SPEC --instance X`, offline
model: it answers at once), the coordinator (`python -m chorus coordinator`) and the
orchestrator (`python -m chorus orchestrator [--direct]`) run as real processes, as in
production; this process submits runs with `RunClient.submit` and waits for each run's
final progress message (`run_completed`, subscribed before the submit), then reads the
record once. Measured, in this order, in the same run:

1. raw baselines (`bench.harness.baselines`): cross-process core request-reply to a tiny
   nats-py responder process (sequential p50/p99, and req/s with 100 in flight), and the
   JetStream work-queue round trip (publish, pull fetch, ack, core reply; sequential
   p50/p99, the worker in this process);
2. a pipeline of 10 `capability` steps on one agent, N runs end to end (submit → the run's
   `run_completed`), per step = run wall time / 10, on the durable path (the orchestrator's
   default: every step a durable task, dispatched by the coordinator) and on the direct
   path (`chorus orchestrator --direct`: steps by core request-reply). Target: per-step p50
   ≤ 2x the raw work-queue round trip p50;
3. a traced round per path (`bench.orchestration_trace`, `--trace N` runs): a tap process
   records every message on the wire while a few pipeline runs go through, and the median
   gap between the messages of a step shows which process the step was waiting for. The
   tap is not running while 2 and 4 are measured;
4. a parallel workflow of 1,000 tasks over 10 agent processes (workflow max_concurrency
   100, agent max_concurrency 16), 3 runs per path, alternated: wall time, tasks/s, per task
   (wall / tasks) against raw request-reply with 100 in flight (1 / its rate);
5. the engine alone (`bench.orchestration_engine`), in this process, with a runner that
   answers at once: the orchestrator's bookkeeping without the hops to the coordinator and
   the agents.

The ~1 KB task is the pipeline's input (each step passes its answer, the input plus a
~27-byte prefix, to the next). The parallel run's input is one short line: every task's
input and answer is kept in the one run record, which must stay under the server's 1 MiB
message limit. During each phase the CPU of every process is read from /proc/<pid>/stat (%
of one core) and the server's message counts from its monitoring port (/varz). Numbers are
printed, never asserted.

    python -m bench.orchestration                 # about 45 s on 2 cores
    python -m bench.orchestration --smoke         # 3 pipeline runs, 100 tasks on 2 agents
    python -m bench.orchestration --profile DIR   # then py-spy the orchestrator/coordinator
    python -m bench.orchestration --keep DIR      # keep the logs, the tap files, the store

`--profile` (needs `pip install py-spy`) runs each Chorus phase once more with py-spy
recording the orchestrator and the coordinator, and prints where their CPU goes; sampling
perturbs the figures, so they come from the rounds before it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.msg import Msg

from bench.harness import cli
from bench.harness.baselines import INSTRUCTIONS, plain_payload, request_reply, work_queue
from bench.harness.fleet import Fleet, running_fleet
from bench.harness.profile import Usage, metered, profiled
from bench.harness.stats import IN_FLIGHT, STALL_S, Figure, pct
from bench.harness.tables import environment_lines, markdown_table
from bench.harness.tap import Trace, tapped
from bench.orchestration_engine import engine_alone, engine_table, kv_size_table
from bench.orchestration_trace import TracedRun, run_level_table, trace_table
from chorus.client.runs import RunClient
from chorus.messages import RunProgress, RunRecord, RunRequest, decode, encode
from chorus.specs.workflow import Parallel, ParallelTask, Pipeline, Step
from chorus.workflows.progress import FINAL_KINDS

PREFIX = "orch"
CAPABILITY = "bench"
PATHS = ("durable", "direct")
STEPS = 10
WORKFLOW_CONCURRENCY = 100
AGENT_CONCURRENCY = 16
RUN_TIMEOUT_S = 120.0  # a run slower than this is reported as stuck

TARGET_STEP_RATIO = 2.0  # pipeline step p50 / raw work-queue round trip p50

PIPELINE_INPUT = "x" * 880
PARALLEL_INPUT = "What makes NATS a good fit for agent systems?"

SPEC = f"""\
name: bencher
description: answers at once (offline model)
model: offline
instructions: Answer at once.
capabilities: [{CAPABILITY}]
max_concurrency: {AGENT_CONCURRENCY}
"""


@dataclass(frozen=True)
class Sizes:
    raw_seq: int
    raw_pipe: int
    wq_seq: int
    pipeline_runs: int
    warmup_runs: int
    parallel_tasks: int
    parallel_agents: int
    parallel_runs: int
    traced_runs: int


DEFAULT = Sizes(
    raw_seq=2000,
    raw_pipe=10000,
    wq_seq=2000,
    pipeline_runs=20,
    warmup_runs=3,
    parallel_tasks=1000,
    parallel_agents=10,
    parallel_runs=3,
    traced_runs=5,
)
SMOKE = Sizes(
    raw_seq=300,
    raw_pipe=1000,
    wq_seq=300,
    pipeline_runs=3,
    warmup_runs=1,
    parallel_tasks=100,
    parallel_agents=2,
    parallel_runs=1,
    traced_runs=2,
)


@dataclass
class Baselines:
    rr_seq: Figure
    rr_pipe: Figure  # 100 in flight
    wq_seq: Figure

    @property
    def rr_p50(self) -> float:
        return self.rr_seq.p50

    @property
    def wq_p50(self) -> float:
        return self.wq_seq.p50

    @property
    def rr_pipe_rate(self) -> float:
        assert self.rr_pipe.rate is not None
        return self.rr_pipe.rate

    @property
    def rr_pipe_us(self) -> float:
        """Microseconds per request with 100 in flight (1 / the rate)."""
        return 1e6 / self.rr_pipe_rate


async def baselines(fleet: Fleet, sizes: Sizes) -> Baselines:
    payload = plain_payload()
    rr_seq, rr_pipe = await request_reply(
        fleet, payload, warmup=200, sequential_n=sizes.raw_seq, in_flight_n=sizes.raw_pipe
    )
    wq_seq, _ = await work_queue(fleet, payload, warmup=100, sequential_n=sizes.wq_seq)
    return Baselines(rr_seq, rr_pipe, wq_seq)


class Deployment:
    """The fleet with one orchestrator (durable or direct) and the runs it is given."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.subjects = fleet.subjects
        self.spec = fleet.workdir / "bencher.yaml"
        self.spec.write_text(SPEC)
        self.orchestrator_mode = ""
        self.runs = RunClient(fleet.nc, self.subjects)

    async def use_orchestrator(self, mode: str) -> None:
        """Run one orchestrator: `durable` (steps through the coordinator) or `direct`."""
        if mode == self.orchestrator_mode:
            return
        await self.fleet.start_orchestrator(direct=mode == "direct")
        self.orchestrator_mode = mode
        # The first run waits in the runs queue until the orchestrator takes it: ready.
        await self.run(pipeline(), PIPELINE_INPUT)

    async def run(self, workflow: Pipeline | Parallel, text: str) -> tuple[float, RunRecord]:
        """Submit a run and wait for its final progress message; wall seconds and record."""
        nc = self.fleet.nc
        request = RunRequest(workflow=workflow, input=text)
        finished: asyncio.Future[RunProgress] = asyncio.get_running_loop().create_future()

        async def on_progress(msg: Msg) -> None:
            progress = decode(msg.data, RunProgress)
            if progress.kind in FINAL_KINDS and not finished.done():
                finished.set_result(progress)

        sub = await nc.subscribe(self.subjects.run_all(request.run_id), cb=on_progress)
        await nc.flush(timeout=5)
        try:
            started = time.perf_counter()
            await self.runs.submit(request)
            try:
                await asyncio.wait_for(asyncio.shield(finished), RUN_TIMEOUT_S)
            except TimeoutError:
                self.fleet.check_alive()
                raise RuntimeError(f"run {request.run_id} did not finish") from None
            wall = time.perf_counter() - started
        finally:
            await sub.unsubscribe()
        record = await self.runs.get(request.run_id)
        if record.status != "completed":
            raise RuntimeError(f"run {record.run_id} {record.status}: {record.error}")
        return wall, record


async def traced_round(
    deployment: Deployment, path: str, runs: int
) -> tuple[Trace, list[TracedRun]]:
    """A few pipeline runs, one at a time, under the tap."""
    await deployment.use_orchestrator(path)
    fleet = deployment.fleet
    traced = []
    async with tapped(fleet.url, fleet.workdir / f"tap-{path}.tsv") as wire:
        for _ in range(runs):
            wall, record = await deployment.run(pipeline(), PIPELINE_INPUT)
            traced.append(TracedRun(record.run_id, wall))
    return Trace(wire), traced


def pipeline() -> Pipeline:
    return Pipeline(
        name="bench-pipeline",
        steps=[
            Step(name=f"s{i}", capability=CAPABILITY, instructions=INSTRUCTIONS)
            for i in range(STEPS)
        ],
    )


def parallel(tasks: int) -> Parallel:
    return Parallel(
        name="bench-parallel",
        tasks=[ParallelTask(name=f"t{i}", capability=CAPABILITY) for i in range(tasks)],
        max_concurrency=WORKFLOW_CONCURRENCY,
        min_success=tasks,
    )


# the measured phases


@dataclass
class PipelineFigures:
    path: str
    walls: list[float]  # seconds per run
    engine_steps_ms: list[float]  # each step's duration_ms as the run record has it
    record_bytes: int
    usage: Usage

    @property
    def per_step_us(self) -> list[float]:
        return [w / STEPS * 1e6 for w in self.walls]


@dataclass
class ParallelFigures:
    path: str
    tasks: int
    agents: int
    wall: float
    record_bytes: int
    spread: Counter[str]
    task_ms: list[float]  # each task's duration_ms in the run record
    done99: float  # seconds from the submit until 99% of the tasks had finished
    usage: Usage
    walls: list[float] = field(default_factory=list)  # every run of this path, seconds

    @property
    def stalled(self) -> int:
        return sum(1 for ms in self.task_ms if ms > STALL_S * 1000)

    @property
    def rate(self) -> float:
        return self.tasks / self.wall

    @property
    def per_task_us(self) -> float:
        return self.wall / self.tasks * 1e6


async def measure_pipeline(deployment: Deployment, path: str, sizes: Sizes) -> PipelineFigures:
    await deployment.use_orchestrator(path)
    for _ in range(sizes.warmup_runs):
        await deployment.run(pipeline(), PIPELINE_INPUT)
    walls: list[float] = []
    steps: list[float] = []
    record: RunRecord | None = None
    async with metered(deployment.fleet) as usage:
        for _ in range(sizes.pipeline_runs):
            wall, record = await deployment.run(pipeline(), PIPELINE_INPUT)
            walls.append(wall)
            steps += [s.duration_ms for s in record.steps]
    assert record is not None
    print(
        f"  pipeline, {path}: {sizes.pipeline_runs} runs, per step p50 "
        f"{pct(walls, 0.5) / STEPS * 1e6:.0f} us",
        file=sys.stderr,
    )
    return PipelineFigures(path, walls, steps, len(encode(record)), usage)


async def measure_parallel(deployment: Deployment, path: str, sizes: Sizes) -> ParallelFigures:
    await deployment.use_orchestrator(path)
    async with metered(deployment.fleet) as usage:
        wall, record = await deployment.run(parallel(sizes.parallel_tasks), PARALLEL_INPUT)
    spread = Counter(s.instance for s in record.steps)
    ended = sorted(s.ended_at for s in record.steps)
    done99 = ended[max(0, int(0.99 * len(ended)) - 1)] - record.created_at
    print(
        f"  parallel, {path}: {sizes.parallel_tasks} tasks in {wall:.1f} s "
        f"({sizes.parallel_tasks / wall:.0f} tasks/s)",
        file=sys.stderr,
    )
    return ParallelFigures(
        path,
        sizes.parallel_tasks,
        len(deployment.fleet.instances),
        wall,
        len(encode(record)),
        spread,
        [s.duration_ms for s in record.steps],
        done99,
        usage,
    )


def median_run(runs: list[ParallelFigures]) -> ParallelFigures:
    """The run with the median wall time, carrying every run's wall time."""
    chosen = sorted(runs, key=lambda r: r.wall)[(len(runs) - 1) // 2]
    chosen.walls = [r.wall for r in runs]
    return chosen


async def profile_rounds(deployment: Deployment, sizes: Sizes, directory: Path) -> None:
    fleet = deployment.fleet
    for path in ("durable", "direct"):
        await deployment.use_orchestrator(path)
        targets = {"orchestrator": fleet.pid("orchestrator")}
        if path == "durable":
            targets["coordinator"] = fleet.pid("coordinator")
        async with profiled(directory, f"pipeline-{path}", targets):
            for _ in range(sizes.pipeline_runs * 5):  # enough samples to read
                await deployment.run(pipeline(), PIPELINE_INPUT)
        async with profiled(directory, f"parallel-{path}", targets):
            await deployment.run(parallel(sizes.parallel_tasks), PARALLEL_INPUT)


# reporting


def cpu_text(usage: Usage) -> str:
    roles = ("orchestrator", "coordinator", "agents", "nats-server", "bench", "other")
    return ", ".join(f"{r} {max(usage.cpu[r], 0):.0f}" for r in roles if r in usage.cpu)


def baseline_table(base: Baselines) -> str:
    rows = [
        [
            "cross-process core request-reply, sequential",
            f"{base.rr_seq.p50:.0f}",
            f"{base.rr_seq.p99:.0f}",
            f"{base.rr_seq.mean_rate:.0f} req/s",
        ],
        [
            f"cross-process core request-reply, {IN_FLIGHT} in flight",
            f"{base.rr_pipe_us:.0f} per request",
            "",
            f"{base.rr_pipe_rate:.0f} req/s",
        ],
        [
            "JetStream work-queue round trip (publish, pull fetch, ack, core reply), sequential",
            f"{base.wq_seq.p50:.0f}",
            f"{base.wq_seq.p99:.0f}",
            f"{base.wq_seq.mean_rate:.0f} req/s",
        ],
    ]
    return markdown_table(["raw baseline (nats-py)", "p50 us", "p99 us", "rate"], rows)


def pipeline_table(figures: list[PipelineFigures], base: Baselines) -> str:
    rows = []
    for f in figures:
        per_step = f.per_step_us
        p50 = pct(per_step, 0.5)
        rows.append(
            [
                f.path,
                str(len(f.walls)),
                f"{pct(f.walls, 0.5) * 1000:.1f}",
                f"{p50:.0f}",
                f"{pct(per_step, 0.9):.0f}",
                f"{statistics.median(f.engine_steps_ms) * 1000:.0f}",
                f"{p50 / base.wq_p50:.2f}x",
                f"{p50 / base.rr_p50:.2f}x",
                f"{f.usage.server['in_msgs'] / (len(f.walls) * STEPS):.1f}",
                cpu_text(f.usage),
            ]
        )
    header = [
        "path",
        "runs",
        "run wall p50 ms",
        "per step p50 us",
        "per step p90 us",
        "step in record p50 us",
        "per step / raw WQ p50",
        "per step / raw req-reply p50",
        "msgs into server per step",
        "CPU % of a core",
    ]
    return markdown_table(header, rows)


def parallel_table(figures: list[ParallelFigures], base: Baselines) -> str:
    rows = []
    for f in figures:
        shares = sorted(f.spread.values(), reverse=True)
        rows.append(
            [
                f.path,
                f"{f.tasks} on {f.agents}",
                f"{f.wall:.2f}"
                + (f" ({min(f.walls):.2f}-{max(f.walls):.2f})" if len(f.walls) > 1 else ""),
                f"{f.rate:.0f}",
                f"{f.per_task_us:.0f}",
                f"{f.per_task_us / base.rr_pipe_us:.1f}x",
                f"{f.per_task_us - base.rr_pipe_us:.0f}",
                f"{pct(f.task_ms, 0.5):.0f} / {pct(f.task_ms, 0.99):.0f}",
                f"{f.stalled} (99% done at {f.done99:.2f} s)" if f.stalled else "0",
                f"{f.record_bytes / 1024:.0f}",
                f"{f.usage.server['in_bytes'] / 2**20:.0f}",
                f"{min(shares)}-{max(shares)}",
                cpu_text(f.usage),
            ]
        )
    header = [
        "path",
        "tasks on agents",
        "wall s (median, min-max)",
        "tasks/s",
        "per task us",
        f"per task / raw req-reply ({IN_FLIGHT} in flight)",
        "overhead per task us",
        "task in record p50 / p99 ms",
        f"tasks over {STALL_S:g} s",
        "final record KiB",
        "MiB into server",
        "tasks per agent",
        "CPU % of a core",
    ]
    return markdown_table(header, rows)


def target_lines(figures: list[PipelineFigures], base: Baselines) -> tuple[list[str], bool]:
    lines, all_met = [], True
    for f in figures:
        ratio = pct(f.per_step_us, 0.5) / base.wq_p50
        met = ratio <= TARGET_STEP_RATIO
        all_met &= met
        lines.append(
            f"- pipeline step, {f.path}: p50 {pct(f.per_step_us, 0.5):.0f} us = {ratio:.2f}x the "
            f"raw work-queue round trip ({base.wq_p50:.0f} us); target ≤ {TARGET_STEP_RATIO:g}x "
            f"— {'met' if met else 'MISSED'}"
        )
    return lines, all_met


async def main_async(args: argparse.Namespace, workdir: Path) -> None:
    sizes = SMOKE if args.smoke else DEFAULT
    if args.repeat:
        sizes = Sizes(**{**sizes.__dict__, "pipeline_runs": args.repeat})
    if args.trace is not None:
        sizes = Sizes(**{**sizes.__dict__, "traced_runs": args.trace})
    load_before = os.getloadavg()
    async with running_fleet(workdir, PREFIX) as fleet:
        deployment = Deployment(fleet)
        print("  raw baselines", file=sys.stderr)
        base = await baselines(fleet, sizes)

        print("  starting the coordinator and one agent", file=sys.stderr)
        await fleet.start_coordinator()
        await fleet.add_agents(1, deployment.spec)
        pipelines = [await measure_pipeline(deployment, path, sizes) for path in PATHS]
        traces = {
            path: await traced_round(deployment, path, sizes.traced_runs)
            for path in ("direct", "durable")
            if sizes.traced_runs
        }

        print(f"  starting {sizes.parallel_agents - 1} more agents", file=sys.stderr)
        await fleet.add_agents(sizes.parallel_agents - 1, deployment.spec)
        by_path: dict[str, list[ParallelFigures]] = {path: [] for path in PATHS}
        for _ in range(sizes.parallel_runs):  # alternated, so drift touches both alike
            for path, path_runs in by_path.items():
                path_runs.append(await measure_parallel(deployment, path, sizes))
        parallels = [median_run(path_runs) for path_runs in by_path.values()]
        print("  the engine alone", file=sys.stderr)
        engine_figures, kv_latencies = await engine_alone(
            fleet.nc,
            pipeline,
            PIPELINE_INPUT,
            lambda: parallel(sizes.parallel_tasks),
            PARALLEL_INPUT,
            warmup=sizes.warmup_runs,
            runs=sizes.pipeline_runs,
        )
        load_after = os.getloadavg()

        command = " ".join(["python -m bench.orchestration", *sys.argv[1:]])
        print("\n".join(environment_lines(command)))
        print(
            f"- load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
            f"CPU `other` = processes outside this benchmark"
        )
        print()
        print(baseline_table(base))
        print()
        print(
            f"Pipeline of {STEPS} `capability` steps on 1 agent, ~1 KB input; per step = run "
            "wall time (submit → run_completed) / 10; `step in record` = the step's "
            "duration_ms in the run record (from before its `running` save to its reply):"
        )
        print()
        print(pipeline_table(pipelines, base))
        print()
        print(
            f"Parallel: workflow max_concurrency {WORKFLOW_CONCURRENCY}, agents "
            f"max_concurrency {AGENT_CONCURRENCY}; {sizes.parallel_runs} run(s) per path, "
            "alternated; the other columns are from the run with the median wall time:"
        )
        print()
        print(parallel_table(parallels, base))
        print()
        for path, (trace, runs) in traces.items():
            print(
                f"Where a pipeline step's time goes, {path} path ({len(runs)} traced runs, "
                f"{len(runs) * STEPS} steps; a tap subscribed to `>`):"
            )
            print()
            print(trace_table(trace, deployment.subjects, runs, path, STEPS, CAPABILITY))
            print()
            per_run = run_level_table(trace, deployment.subjects, runs)
            print(markdown_table(["per run", "median us"], per_run))
            print()
        print(
            "What the orchestrator's own work costs: the engine in this process with a "
            "runner that answers at once (no agent, no network hop for the task):"
        )
        print()
        print(engine_table(engine_figures))
        print()
        print(kv_size_table(kv_latencies))
        print()
        targets, all_met = target_lines(pipelines, base)
        print("Targets:")
        print("\n".join(targets))
        if args.profile is not None:
            await profile_rounds(deployment, sizes, args.profile)
        elif not all_met:
            print(
                "\nA target was missed: run with `--profile DIR` (pip install py-spy) to "
                "see where the orchestrator's and the coordinator's CPU goes."
            )


def main() -> int:
    parser = cli.parser(
        "bench.orchestration",
        __doc__,
        trace="pipeline runs traced per path (0: no traced round; default 5, smoke 2)",
        repeat="pipeline runs per path (default 20, smoke 3)",
        profile="after the measured rounds, py-spy each phase again; the profiles go here",
    )
    return cli.run(main_async, parser.parse_args(), "chorus-orch-")


if __name__ == "__main__":
    raise SystemExit(main())
