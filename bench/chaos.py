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
    python -m bench.chaos --smoke   # 2 agents, 60 tasks, 6 runs, 1 kill of each kind (~30 s)
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
from bench.chaos_audit import Resubmission, RunSubmission, Submission, invariants, read_stores
from bench.chaos_fleet import KINDS, ChaosFleet, Kind, chaos_fleet
from bench.chaos_report import BURST_IN_FLIGHT, Raw, print_rich, report
from bench.harness import baselines
from bench.harness.cli import parser, workdir
from bench.harness.stats import Figure, in_flight
from chorus.client.durable import TaskQueue
from chorus.client.runs import RunClient
from chorus.config import EXAMPLE_WORKFLOWS, Settings
from chorus.errors import ChorusError
from chorus.messages import RunRequest, Task
from chorus.specs.workflow import Parallel, Pipeline, WorkflowSpec, load_workflow

WORKFLOWS = ("research-report.yaml", "perspectives.yaml")  # a pipeline, a parallel


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
    resubmit: int  # completed task ids submitted again at the end
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
    resubmit=10,
    work=(0.05, 0.5),
)
SMOKE = Sizes(
    agents=2,
    tasks=60,
    rate=6.0,
    runs=6,
    poison=3,
    kills_each=1,
    down=0.5,
    drain=60.0,
    burst=50,
    resubmit=5,
    work=(0.02, 0.2),
)
# The one setting a chaos run changes by default: a de-duplication window shorter than the
# run, so the task ids submitted again at the end come after it (the lookup by id answers).
DEFAULT_ENV = {"CHORUS_DEDUPE_WINDOW": "30"}
# The smoke run's children also lose a claim or an instance in seconds.
SMOKE_ENV = {
    "CHORUS_HEARTBEAT_INTERVAL": "0.5",
    "CHORUS_CLAIM_TIMEOUT": "3",
    "CHORUS_RETRY_BACKOFF": "0.2",
    "CHORUS_DEDUPE_WINDOW": "3",
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
    cli.add_argument(
        "--resubmit",
        type=int,
        help=f"completed task ids submitted again at the end ({DEFAULT.resubmit})",
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
        for name in (
            "agents",
            "tasks",
            "rate",
            "runs",
            "poison",
            "kills_each",
            "down",
            "drain",
            "burst",
            "resubmit",
        )
        if getattr(args, name) is not None
    }
    sizes = replace(base, **chosen)
    if sizes.agents < 1 or sizes.tasks < 1 or sizes.rate <= 0:
        raise SystemExit("--agents, --tasks and --rate must be positive")
    if not 0 <= sizes.poison <= sizes.tasks:
        raise SystemExit("--poison must be between 0 and --tasks")
    return sizes


def children_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(SMOKE_ENV if args.smoke else DEFAULT_ENV)
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

    async def resubmit(self, plan: list[Submission], n: int) -> list[Resubmission]:
        """Submit the first `n` completed task ids again, as a client retrying would: each
        must not be queued again and must answer with the outcome already stored."""
        done = [s for s in plan if s.heard is not None and s.heard.status == "completed"][:n]
        again = []
        for s in done:
            r = Resubmission(s.task_id, time.time() - s.submitted_at)
            task = Task(input=f"task {s.task_id}", task_id=s.task_id, data={"seconds": s.work_s})
            try:
                r.queued = await self.queue.submit(task, capability=CAPABILITY)
                r.heard = await self.queue.wait(s.task_id, timeout=10)
            except (ChorusError, nats.errors.Error, TimeoutError) as exc:
                r.error = f"{type(exc).__name__}: {exc}"
            again.append(r)
        return again

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
        """Wait for every submitter and run, at most `drain` seconds once the submissions and
        faults are over; a submitter still waiting then is cancelled (its task counts as
        lost or missed)."""
        waiting = [self.runs.wait(r.run_id, self.sizes.drain) for r in runs if not r.error]
        finishing = asyncio.gather(*waiting, return_exceptions=True)
        _, pending = await asyncio.wait(self.submitters, timeout=self.sizes.drain)
        for submitter in pending:
            submitter.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await finishing


# measured on the same server


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
        log(f"{sizes.resubmit} task ids submitted again ...")
        again = await load.resubmit(tasks, sizes.resubmit)
        await load.queue.close()
        stores = await read_stores(fleet.nc.jetstream(), fleet.subjects, [r.run_id for r in runs])
        checks = invariants(tasks, runs, again, stores)
        burst = None
        if sizes.burst:
            log(f"throughput after the chaos: {sizes.burst} durable tasks ...")
            burst = await measure_burst(fleet, sizes.burst)
        config = {**asdict(sizes), "kills": args.kinds, "seed": args.seed}
        return report(config, env, tasks, runs, again, stores, checks, fleet.faults, raw, burst)


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
