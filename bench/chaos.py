"""Chaos: a real Chorus system under load while its processes are killed with SIGKILL.

One embedded nats-server (JetStream on a store dir that outlives it), a coordinator, an
orchestrator and N agent processes (`bench.chaos_agent`), all real processes. This process
submits M durable tasks at R per second (P of them poison: they fail on every attempt) and
K workflow runs (the example `research-report` pipeline and `perspectives` parallel
workflows, every step sent to the chaos agents), and meanwhile kills, by pid and with
SIGKILL, agents, the coordinator, the orchestrator and the nats-server on a seeded
schedule, each started again after `--down` seconds (a killed agent as a new instance, the
server on the same port and store).

At the end it reads the stores (every outcome write the tasks bucket kept, the dead-letter
stream, the run records), not only what the submitters heard, and checks: no task lost, no
outcome written twice, every submitter heard what is stored, poison tasks dead-lettered
exactly once and nothing else, every run completed. It prints the counts, the checks, each
fault with how long the system took to serve again, task latency, and the throughput of the
recovered system against raw nats-py measured on the same server in the same run; it exits
1 when a check fails.

    python -m bench.chaos           # 8 agents, 1,000 tasks at 15/s, 30 runs, 3 kills of each kind
    python -m bench.chaos --smoke   # 2 agents, 60 tasks, 4 runs, 1 kill of each kind (~30 s)
    python -m bench.chaos --kills agents,server --kills-each 5 --seed 7
    python -m bench.chaos --json                # the report as JSON on stdout
    python -m bench.chaos --claim-timeout 5 --heartbeat 0.5   # the children's settings

Timings are printed, never checked: a loaded machine is slower, not wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
import nats.errors

from bench.chaos_agent import CAPABILITY
from bench.chaos_audit import (
    Check,
    RunSubmission,
    Stores,
    Submission,
    invariants,
    read_stores,
)
from bench.chaos_fleet import KINDS, ChaosFleet, Fault, Kind, chaos_fleet
from bench.harness import baselines
from bench.harness.cli import parser, workdir
from bench.harness.stats import Figure, in_flight, pct
from bench.harness.tables import environment_lines
from chorus.client.durable import TaskQueue
from chorus.client.runs import RunClient
from chorus.config import EXAMPLE_WORKFLOWS, Settings
from chorus.errors import ChorusError
from chorus.messages import RunRequest, Task
from chorus.specs.workflow import Parallel, Pipeline, WorkflowSpec, load_workflow

WORKFLOWS = ("research-report.yaml", "perspectives.yaml")  # a pipeline, a parallel
BURST_IN_FLIGHT = 100


@dataclass(frozen=True)
class Sizes:
    agents: int
    tasks: int
    rate: float
    runs: int
    poison: int
    kills_each: int
    down: float
    drain: float
    burst: int
    work: tuple[float, float]  # seconds of simulated work per task, uniform in [lo, hi]


DEFAULT = Sizes(
    agents=8,
    tasks=1000,
    rate=15.0,
    runs=30,
    poison=20,
    kills_each=3,
    down=1.0,
    drain=300.0,
    burst=1000,
    work=(0.05, 0.5),
)
SMOKE = Sizes(
    agents=2,
    tasks=60,
    rate=6.0,
    runs=4,
    poison=3,
    kills_each=1,
    down=0.5,
    drain=60.0,
    burst=50,
    work=(0.02, 0.2),
)
# Settings the smoke run gives its children, so a lost claim or instance costs seconds.
SMOKE_ENV = {
    "CHORUS_HEARTBEAT_INTERVAL": "0.5",
    "CHORUS_CLAIM_TIMEOUT": "3",
    "CHORUS_RETRY_BACKOFF": "0.2",
}


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    cli = parser("bench.chaos", __doc__)
    cli.add_argument("--agents", type=int, help=f"agent processes ({DEFAULT.agents})")
    cli.add_argument("--tasks", type=int, help=f"durable tasks submitted ({DEFAULT.tasks})")
    cli.add_argument("--rate", type=float, help=f"tasks submitted per second ({DEFAULT.rate})")
    cli.add_argument("--runs", type=int, help=f"workflow runs ({DEFAULT.runs})")
    cli.add_argument("--poison", type=int, help=f"tasks that always fail ({DEFAULT.poison})")
    cli.add_argument(
        "--kills",
        default=",".join(KINDS),
        help="what to kill, comma-separated: agents,coordinator,orchestrator,server "
        "(default all; '' for none)",
    )
    cli.add_argument("--kills-each", type=int, help=f"kills of each kind ({DEFAULT.kills_each})")
    cli.add_argument(
        "--down", type=float, help=f"seconds a killed process stays down ({DEFAULT.down})"
    )
    cli.add_argument(
        "--drain", type=float, help=f"seconds to wait for the last outcomes ({DEFAULT.drain})"
    )
    cli.add_argument(
        "--burst",
        type=int,
        help=f"durable tasks of the throughput phase, 0: none ({DEFAULT.burst})",
    )
    cli.add_argument("--seed", type=int, default=1, help="the schedule's random seed (1)")
    cli.add_argument("--heartbeat", type=float, help="CHORUS_HEARTBEAT_INTERVAL of the children")
    cli.add_argument("--claim-timeout", type=float, help="CHORUS_CLAIM_TIMEOUT of the children")
    cli.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another setting for the children (repeatable)",
    )
    cli.add_argument("--json", action="store_true", help="print the report as JSON only")
    args = cli.parse_args(argv)
    kills = [k for k in args.kills.split(",") if k]
    unknown = sorted(set(kills) - set(KINDS))
    if unknown:
        cli.error(f"--kills: unknown {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    args.kinds = kills
    return args


def sizes_of(args: argparse.Namespace) -> Sizes:
    base = SMOKE if args.smoke else DEFAULT
    chosen = {
        name: getattr(args, name)
        for name in ("agents", "tasks", "rate", "runs", "poison", "kills_each", "down", "drain")
        if getattr(args, name) is not None
    }
    if args.burst is not None:
        chosen["burst"] = args.burst
    sizes = replace(base, **chosen)
    if sizes.agents < 1 or sizes.tasks < 1 or sizes.rate <= 0:
        raise SystemExit("--agents, --tasks and --rate must be positive")
    if not 0 <= sizes.poison <= sizes.tasks:
        raise SystemExit("--poison must be between 0 and --tasks")
    return sizes


def children_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(SMOKE_ENV) if args.smoke else {}
    if args.heartbeat is not None:
        env["CHORUS_HEARTBEAT_INTERVAL"] = str(args.heartbeat)
    if args.claim_timeout is not None:
        env["CHORUS_CLAIM_TIMEOUT"] = str(args.claim_timeout)
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--env {item!r}: write NAME=VALUE, e.g. CHORUS_MAX_ATTEMPTS=3")
        env[name] = value
    Settings.from_env(env)  # a bad value fails here, named, not in every child
    return env


# the plan


def workflows() -> list[WorkflowSpec]:
    """The example pipeline and parallel workflows, every step sent to the chaos agents."""
    chosen: list[WorkflowSpec] = []
    for name in WORKFLOWS:
        workflow = load_workflow(EXAMPLE_WORKFLOWS / name)
        if isinstance(workflow, Pipeline):
            steps = [
                msgspec.structs.replace(s, name=s.key, agent="", capability=CAPABILITY)
                for s in workflow.steps
            ]
            workflow = msgspec.structs.replace(workflow, steps=steps)
        elif isinstance(workflow, Parallel):
            tasks = [
                msgspec.structs.replace(t, name=t.key, agent="", capability=CAPABILITY)
                for t in workflow.tasks
            ]
            workflow = msgspec.structs.replace(workflow, tasks=tasks)
        chosen.append(workflow)
    return chosen


def task_plan(sizes: Sizes, rng: random.Random) -> list[Submission]:
    nonce = uuid.uuid4().hex[:6]
    poison = set(rng.sample(range(sizes.tasks), sizes.poison))
    return [
        Submission(
            task_id=f"chaos-{nonce}-{n:05d}",
            poison=n in poison,
            work_s=0.0 if n in poison else rng.uniform(*sizes.work),
            submitted_at=0.0,
        )
        for n in range(sizes.tasks)
    ]


def kill_plan(
    kinds: list[Kind], each: int, window: float, rng: random.Random
) -> list[tuple[float, Kind]]:
    """When (seconds into the submissions) to kill what: spread over the middle 80% of the
    window, in a seeded order, with some jitter."""
    order = [kind for kind in kinds for _ in range(each)]
    rng.shuffle(order)
    if not order:
        return []
    slot = 0.8 * window / len(order)
    return [
        (0.1 * window + slot * (n + rng.uniform(0.0, 0.5)), kind) for n, kind in enumerate(order)
    ]


# the load


class Load:
    """Submits the tasks and runs on schedule and deals the faults meanwhile."""

    def __init__(self, fleet: ChaosFleet, sizes: Sizes, rng: random.Random) -> None:
        self.fleet = fleet
        self.sizes = sizes
        self.rng = rng
        self.queue = TaskQueue(fleet.nc, fleet.subjects)
        self.runs = RunClient(fleet.nc, fleet.subjects)
        self.started = 0.0
        self.submitters: list[asyncio.Task[None]] = []

    async def _task(self, s: Submission, timeout: float) -> None:
        task = Task(
            input=f"task {s.task_id}",
            task_id=s.task_id,
            data={"poison": True} if s.poison else {"seconds": s.work_s},
        )
        s.submitted_at = time.time()
        try:
            s.accepted = await self.queue.submit(task, capability=CAPABILITY)
        except (ChorusError, nats.errors.Error, TimeoutError) as exc:
            s.error = f"submit: {type(exc).__name__}: {exc}"
            return
        try:
            s.heard = await self.queue.wait(s.task_id, timeout=timeout)
        except (ChorusError, nats.errors.Error, TimeoutError) as exc:
            s.error = f"wait: {type(exc).__name__}: {exc}"

    async def _run(self, r: RunSubmission, workflow: WorkflowSpec) -> None:
        r.workflow, r.submitted_at = workflow.name, time.time()
        try:
            await self.runs.submit(RunRequest(run_id=r.run_id, workflow=workflow, input=r.run_id))
        except (ChorusError, nats.errors.Error, TimeoutError) as exc:
            r.error = f"{type(exc).__name__}: {exc}"

    async def _at(self, offset: float) -> None:
        await asyncio.sleep(max(0.0, self.started + offset - time.monotonic()))

    async def submit_tasks(self, plan: list[Submission], timeout: float) -> None:
        for n, s in enumerate(plan):
            await self._at(n / self.sizes.rate)
            self.submitters.append(asyncio.create_task(self._task(s, timeout)))

    async def submit_runs(self, plan: list[RunSubmission], window: float) -> None:
        shapes = workflows()  # checked before the run starts (chaos() calls it first)
        for n, r in enumerate(plan):
            await self._at(window * n / max(1, len(plan)))
            await self._run(r, shapes[n % len(shapes)])

    async def deal_faults(self, plan: list[tuple[float, Kind]]) -> None:
        for offset, kind in plan:
            await self._at(offset)
            await self.fleet.deal(kind, self.rng)  # one at a time: each victim back first

    async def go(
        self, tasks: list[Submission], runs: list[RunSubmission], faults: list[tuple[float, Kind]]
    ) -> None:
        window = self.sizes.tasks / self.sizes.rate
        self.started = time.monotonic()
        await asyncio.gather(
            self.submit_tasks(tasks, timeout=window + self.sizes.drain),
            self.submit_runs(runs, window),
            self.deal_faults(faults),
        )

    async def drain(self, runs: list[RunSubmission]) -> None:
        """Wait for every submitter and run, at most `drain` seconds after the last fault."""
        waiting = [self.runs.wait(r.run_id, self.sizes.drain) for r in runs if not r.error]
        finishing = asyncio.gather(*waiting, return_exceptions=True)
        _, pending = await asyncio.wait(self.submitters, timeout=self.sizes.drain)
        for submitter in pending:
            submitter.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await finishing
        await self.queue.close()


# figures


def percentile_ms(values: list[float], q: float) -> float | None:
    return pct(values, q) * 1000 if values else None


def fault_rows(
    faults: list[Fault], tasks: list[Submission], stores: Stores
) -> list[dict[str, Any]]:
    """Each fault: how long its victim was down, how long until the system served again (the
    first outcome stored after the kill; for the orchestrator, the first step record
    written), and until every task submitted before it had its outcome (caught up)."""
    outcome_times = sorted(t for w in stores.outcomes.values() for t in w.times[:1])
    started = min((s.submitted_at for s in tasks if s.submitted_at), default=0.0)
    rows = []
    for fault in faults:
        served_by = stores.step_writes if fault.kind == "orchestrator" else outcome_times
        served = next((t for t in served_by if t > fault.killed_at), None)
        if fault.kind == "orchestrator":
            late = [
                next((t for t in sorted(stores.run_writes.get(r, [])) if t > fault.killed_at), None)
                for r, record in stores.runs.items()
                if record is not None
                and record.created_at < fault.killed_at
                and (record.ended_at == 0 or record.ended_at > fault.killed_at)
            ]
        else:
            late = [
                stores.outcomes[s.task_id].at if s.task_id in stores.outcomes else None
                for s in tasks
                if s.accepted
                and s.submitted_at < fault.killed_at
                and (
                    s.task_id not in stores.outcomes
                    or stores.outcomes[s.task_id].at > fault.killed_at
                )
            ]
        caught: float | None
        if any(t is None for t in late):
            caught = None  # something pending at this fault never moved again
        else:
            caught = (
                max((t for t in late if t is not None), default=fault.killed_at) - fault.killed_at
            )
        rows.append(
            {
                "kind": fault.kind,
                "victim": fault.victim,
                "killed_at": fault.killed_at,
                "at_s": fault.killed_at - started,
                "down_s": fault.back_at - fault.killed_at,
                "served_again_s": None if served is None else served - fault.killed_at,
                "caught_up_s": caught,
                "pending": len(late),
            }
        )
    return rows


@dataclass
class Raw:
    request_reply_p50_us: float
    work_queue_p50_us: float
    request_reply_rate: float
    work_queue_rate: float


async def measure_raw(fleet: ChaosFleet, smoke: bool) -> Raw:
    """Raw nats-py on the same server: request-reply and the JetStream work queue."""
    payload = baselines.plain_payload()
    n = 100 if smoke else 1000
    seq, pipe = await baselines.request_reply(
        fleet, payload, warmup=20, sequential_n=n, in_flight_n=n * 2
    )
    wq_seq, wq_pipe = await baselines.work_queue(
        fleet, payload, warmup=20, sequential_n=n, in_flight_n=n * 2
    )
    assert pipe.rate is not None and wq_pipe is not None and wq_pipe.rate is not None
    return Raw(seq.p50, wq_seq.p50, pipe.rate, wq_pipe.rate)


async def measure_burst(fleet: ChaosFleet, n: int) -> Figure:
    """Durable tasks with no work, BURST_IN_FLIGHT outstanding, on the recovered system."""
    queue = TaskQueue(fleet.nc, fleet.subjects)
    figure = Figure(f"chorus durable, {BURST_IN_FLIGHT} in flight")

    async def call() -> object:
        return await queue.run(
            Task(input="burst", data={"seconds": 0}), capability=CAPABILITY, timeout=60
        )

    try:
        await in_flight(call, n, figure, BURST_IN_FLIGHT)
    finally:
        await queue.close()
    return figure


def report(
    args: argparse.Namespace,
    sizes: Sizes,
    env: dict[str, str],
    tasks: list[Submission],
    runs: list[RunSubmission],
    stores: Stores,
    checks: list[Check],
    faults: list[Fault],
    raw: Raw,
    burst: Figure | None,
) -> dict[str, Any]:
    settings = Settings.from_env(env)
    accepted = [s for s in tasks if s.accepted]
    stored = [s for s in accepted if s.task_id in stores.outcomes]
    good = [s for s in stored if not s.poison]
    latency = [stores.outcomes[s.task_id].at - s.submitted_at for s in good]
    overhead = [stores.outcomes[s.task_id].at - s.submitted_at - s.work_s for s in good]
    last_submit = max((s.submitted_at for s in accepted), default=0.0)
    last_outcome = max((stores.outcomes[s.task_id].at for s in stored), default=0.0)
    first_submit = min((s.submitted_at for s in accepted), default=0.0)
    completed_runs = sum(
        1 for r in stores.runs.values() if r is not None and r.status == "completed"
    )
    overhead_p50 = percentile_ms(overhead, 0.5)
    bound = 2 * settings.heartbeat_interval + settings.claim_timeout
    throughput: dict[str, Any] = {
        "offered_per_s": sizes.rate,
        "achieved_per_s": len(stored) / (last_outcome - first_submit) if stored else None,
        "raw_request_reply_per_s": raw.request_reply_rate,
        "raw_work_queue_per_s": raw.work_queue_rate,
    }
    if burst is not None and burst.rate is not None:
        throughput["burst_per_s"] = burst.rate
        throughput["burst_vs_raw_work_queue"] = burst.rate / raw.work_queue_rate
        throughput["burst_vs_raw_request_reply"] = burst.rate / raw.request_reply_rate
    return {
        "ok": all(c.ok for c in checks),
        "config": {
            **asdict(sizes),
            "kills": args.kinds,
            "seed": args.seed,
            "children_env": env,
            "heartbeat_interval": settings.heartbeat_interval,
            "claim_timeout": settings.claim_timeout,
            "dead_after": settings.dead_after,
        },
        "counts": {
            "tasks_submitted": len(tasks),
            "tasks_accepted": len(accepted),
            "outcomes_stored": len(stored),
            "lost": len(accepted) - len(stored),
            "outcomes_written_twice": sum(
                1 for w in stores.outcomes.values() if len(w.outcomes) > 1
            ),
            "outcome_keys": len(stores.outcomes),
            "poison": sum(1 for s in accepted if s.poison),
            "dead_letters": sum(stores.dead_letters.values()),
            "runs_submitted": len(runs),
            "runs_completed": completed_runs,
            "submitter_errors": sum(1 for s in tasks if s.error),
        },
        "checks": [asdict(c) for c in checks],
        "timings": {
            "last_submit_to_last_outcome_s": last_outcome - last_submit if stored else None,
            "latency_p50_ms": percentile_ms(latency, 0.5),
            "latency_p99_ms": percentile_ms(latency, 0.99),
            "latency_max_ms": percentile_ms(latency, 1.0),
            "overhead_p50_ms": overhead_p50,
            "overhead_p99_ms": percentile_ms(overhead, 0.99),
            "raw_request_reply_p50_ms": raw.request_reply_p50_us / 1000,
            "raw_work_queue_p50_ms": raw.work_queue_p50_us / 1000,
            "overhead_p50_vs_raw_work_queue": (
                overhead_p50 / (raw.work_queue_p50_us / 1000) if overhead_p50 else None
            ),
            "lateness_bound_s": bound,
        },
        "throughput": throughput,
        "faults": fault_rows(faults, tasks, stores),
        "errors": [f"{s.task_id}: {s.error}" for s in tasks if s.error][:20],
    }


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def millis(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f} ms"


def print_rich(result: dict[str, Any], command: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=120)
    for line in environment_lines(command):
        console.print(line, highlight=False, markup=False)
    counts, timings, throughput = result["counts"], result["timings"], result["throughput"]

    table = Table(title="Chaos run")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("tasks submitted", f"{counts['tasks_submitted']} ({counts['poison']} poison)"),
        ("outcomes stored", str(counts["outcomes_stored"])),
        ("lost", str(counts["lost"])),
        ("outcomes written twice", str(counts["outcomes_written_twice"])),
        ("runs completed", f"{counts['runs_completed']} / {counts['runs_submitted']}"),
        ("dead letters", f"{counts['dead_letters']} (poison: {counts['poison']})"),
        ("last submit → last outcome", seconds(timings["last_submit_to_last_outcome_s"])),
        (
            "task latency p50 / p99",
            f"{millis(timings['latency_p50_ms'])} / {millis(timings['latency_p99_ms'])}",
        ),
        ("task latency max", millis(timings["latency_max_ms"])),
        (
            "overhead p50 / p99 (latency - work)",
            f"{millis(timings['overhead_p50_ms'])} / {millis(timings['overhead_p99_ms'])}",
        ),
        ("raw work-queue round trip p50", millis(timings["raw_work_queue_p50_ms"])),
        ("raw request-reply p50", millis(timings["raw_request_reply_p50_ms"])),
        (
            "throughput offered / achieved",
            f"{throughput['offered_per_s']:.1f} / {throughput['achieved_per_s'] or 0:.1f} per s",
        ),
    ]
    if "burst_per_s" in throughput:
        rows += [
            (
                f"after the chaos: durable, {BURST_IN_FLIGHT} in flight",
                f"{throughput['burst_per_s']:,.0f} per s",
            ),
            (
                "  vs raw work queue / raw request-reply",
                f"{throughput['burst_vs_raw_work_queue']:.0%} / "
                f"{throughput['burst_vs_raw_request_reply']:.0%}",
            ),
        ]
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)

    faults = Table(
        title="Faults (lateness bound: 2 heartbeats + claim timeout = "
        f"{timings['lateness_bound_s']:.1f} s)"
    )
    for column in ("#", "at", "kind", "victim", "down", "served again after", "caught up after"):
        faults.add_column(column, justify="left" if column in ("kind", "victim") else "right")
    faults.add_column("pending at the kill", justify="right")
    for n, row in enumerate(result["faults"], 1):
        caught = row["caught_up_s"]
        over = caught is not None and caught > timings["lateness_bound_s"]
        faults.add_row(
            str(n),
            seconds(row["at_s"]),
            row["kind"],
            row["victim"],
            seconds(row["down_s"]),
            seconds(row["served_again_s"]),
            ("[red]" if over or caught is None else "") + seconds(caught),
            str(row["pending"]),
        )
    console.print(faults)

    checks = Table(title="Checks")
    checks.add_column("check")
    checks.add_column("ok")
    checks.add_column("detail")
    for check in result["checks"]:
        checks.add_row(check["name"], "[green]yes" if check["ok"] else "[red]NO", check["detail"])
    console.print(checks)
    for error in result["errors"]:
        console.print(f"- {error}", highlight=False, markup=False)
    console.print("[green]all checks hold" if result["ok"] else "[red]a check failed")


async def chaos(args: argparse.Namespace, where: Path) -> dict[str, Any]:
    sizes = sizes_of(args)
    env = children_env(args)
    rng = random.Random(args.seed)
    tasks = task_plan(sizes, rng)
    nonce = uuid.uuid4().hex[:6]
    runs = [RunSubmission(f"chaos-run-{nonce}-{n:03d}", "", 0.0) for n in range(sizes.runs)]
    window = sizes.tasks / sizes.rate
    faults = kill_plan(args.kinds, sizes.kills_each, window, rng)
    workflows()  # an example workflow that no longer loads fails here, before any process

    # This process's own Chorus logs (its reconnects while the server is down) go to a file.
    chorus_logs = logging.getLogger("chorus")
    chorus_logs.addHandler(logging.FileHandler(where / "bench.log"))
    chorus_logs.propagate = False

    def log(text: str) -> None:
        if not args.json:
            print(text, file=sys.stderr)

    async with chaos_fleet(where, env, agents=sizes.agents, down_s=sizes.down) as fleet:
        log("raw nats-py baselines ...")
        raw = await measure_raw(fleet, args.smoke)
        log(f"{sizes.tasks} tasks at {sizes.rate}/s, {sizes.runs} runs, {len(faults)} kills ...")
        load = Load(fleet, sizes, rng)
        await load.go(tasks, runs, faults)
        log("draining ...")
        await load.drain(runs)
        stores = await read_stores(fleet.nc.jetstream(), fleet.subjects, [r.run_id for r in runs])
        checks = invariants(tasks, runs, stores)
        burst = None
        if sizes.burst:
            log(f"throughput after the chaos: {sizes.burst} durable tasks ...")
            burst = await measure_burst(fleet, sizes.burst)
        return report(args, sizes, env, tasks, runs, stores, checks, fleet.faults, raw, burst)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    with workdir(args.keep, "chorus-chaos-") as where:
        result = asyncio.run(chaos(args, where))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_rich(
            result, "python -m bench.chaos " + " ".join(sys.argv[1:] if argv is None else argv)
        )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
