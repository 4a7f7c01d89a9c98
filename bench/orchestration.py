"""Orchestration overhead: workflow runs through the orchestrator, against raw nats-py figures.

One embedded nats-server; agents (`python -m chorus agent run SPEC --instance X`, offline
model: it answers at once), the coordinator (`python -m chorus coordinator`) and the
orchestrator (`python -m chorus orchestrator [--direct]`) run as real processes, as in
production; this process submits runs with `RunClient.submit` and waits for each run's
final progress message (`run_completed`, subscribed before the submit), then reads the
record once. Measured, in this order, in the same run:

1. raw baselines, as /work/shared/bench/nats_baseline.py measures them: cross-process core
   request-reply to a tiny nats-py responder process (sequential p50/p99, and req/s with
   100 in flight), and the JetStream work-queue round trip (publish, pull fetch, ack, core
   reply; sequential p50/p99, the worker in this process);
2. a pipeline of 10 `capability` steps on one agent, N runs end to end (submit → the run's
   `run_completed`), per step = run wall time / 10, on the durable path (the orchestrator's
   default: every step a durable task, dispatched by the coordinator) and on the direct
   path (`chorus orchestrator --direct`: steps by core request-reply). Target: per-step p50
   ≤ 2x the raw work-queue round trip p50;
3. a parallel workflow of 1,000 tasks over 10 agent processes (workflow max_concurrency
   100, agent max_concurrency 16), 3 runs per path, alternated: wall time, tasks/s, per task
   (wall / tasks) against raw request-reply with 100 in flight (1 / its rate).

The ~1 KB task of nats_baseline.py is the pipeline's input (each step passes its answer,
the input plus a ~27-byte prefix, to the next). The parallel run's input is one short line:
every task's input and answer is kept in the one run record, which must stay under the
server's 1 MiB message limit.

During each phase the CPU of every process is read from /proc/<pid>/stat (% of one core;
the machine has 2) and the server's message counts from its monitoring port (/varz).

4. a traced round per path: a tap process subscribed to `>` (a bare socket, no client
   library, so its timestamps are taken as the bytes arrive) records every message on the
   wire while a few pipeline runs go through; the median gap between the messages of a step
   (run record saves and their acks, progress, the task's publish, the coordinator's pull
   request and its request to the agent, the reply, the outcome's KV create) shows which
   process the step was waiting for. The tap is not running while 2 and 3 are measured;
5. the engine alone, in this process, with a runner that answers at once: per pipeline
   step and for the parallel run, with an in-memory store (the engine's own Python) and
   with the KV store and NATS progress the orchestrator uses; and the KV update latency
   for the record sizes the runs reach. This separates the orchestrator's bookkeeping from
   the hops to the coordinator and the agents.

    python bench/orchestration.py                 # about 45 s on 2 cores
    python bench/orchestration.py --smoke         # 3 pipeline runs, 100 tasks on 2 agents
    python bench/orchestration.py --profile DIR   # then py-spy the orchestrator/coordinator
    python bench/orchestration.py --keep DIR      # keep the logs, the tap files, the store

`--profile` (needs `pip install py-spy`) runs each Chorus phase once more with py-spy
recording the orchestrator and the coordinator, and prints where their CPU goes; sampling
perturbs the figures, so they come from the rounds before it. Numbers are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.client.runs import RunClient
from chorus.client.runstore import KvRunStore
from chorus.config import Settings
from chorus.messages import (
    AgentStatusChange,
    Heartbeat,
    Result,
    RunProgress,
    RunRecord,
    RunRequest,
    Task,
    decode,
    encode,
)
from chorus.messages import Usage as MsgUsage
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer, find_binary
from chorus.specs.workflow import Parallel, ParallelTask, Pipeline, Step
from chorus.subjects import Subjects
from chorus.workflows.engine import Engine, new_record
from chorus.workflows.progress import FINAL_KINDS, NatsProgress, NoProgress
from chorus.workflows.protocols import ProgressSink, RunStore
from chorus.workflows.run import task_id

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Child, cpu_seconds, machine_busy_seconds, markdown_table, spawn

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "orch"
CAPABILITY = "bench"
STEPS = 10
IN_FLIGHT = 100
WORKFLOW_CONCURRENCY = 100
AGENT_CONCURRENCY = 16
TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 120.0  # a run slower than this is reported as stuck
STALL_S = 5.0  # a task this slow waited for a redelivery (the claim timeout is 30 s)

TARGET_STEP_RATIO = 2.0  # pipeline step p50 / raw work-queue round trip p50

# The ~1 KB task of nats_baseline.py.
INSTRUCTIONS = "Research the topic." * 5
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

# The responder of nats_baseline.py.
RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def handler(msg):
        await msg.respond(b'{"output":"ok"}')
    await nc.subscribe("benchraw.xecho", queue="q", cb=handler)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

# Timestamps what the server sends to a `>` subscriber, read straight off the socket (no
# client library, no event loop: the process sleeps in recv(), so a timestamp is taken within
# a few microseconds of the bytes arriving). Writes (ns, length, bytes) records to argv[3]
# and exits when it sees a message on `benchtap.stop`.
TAP = r"""
import socket, struct, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.recv(65536)  # INFO
s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n'
          b'SUB > 1\r\nPING\r\n')
seen = b""
while b"PONG\r\n" not in seen:
    seen += s.recv(65536)
print("ready", flush=True)
chunks, last = [], b""
while True:
    chunk = s.recv(1 << 20)
    now = time.perf_counter_ns()
    if not chunk:
        break
    chunks.append((now, chunk))
    if b"PING\r\n" in chunk:
        s.sendall(b"PONG\r\n")
    if b"benchtap.stop" in last[-64:] + chunk:
        break
    last = chunk
with open(sys.argv[3], "wb") as out:
    for now, chunk in chunks:
        out.write(struct.pack("<QI", now, len(chunk)) + chunk)
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


# processes, their CPU, the server's counters


def child_env(nats_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "NATS_URL": nats_url,
            "CHORUS_PREFIX": PREFIX,
            # The code of this checkout, whatever the venv's editable install points at.
            "PYTHONPATH": os.pathsep.join([str(ROOT / "shared"), str(ROOT)]),
        }
    )
    return env


@dataclass
class Fleet:
    """Every process of the run by role, so a phase can tell where the CPU went."""

    pids: dict[str, list[int]] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)

    def add(self, role: str, pid: int) -> None:
        self.pids.setdefault(role, []).append(pid)

    def adopt(self, child: Child) -> Child:
        self.children.append(child)
        self.add(child.role, child.pid)
        return child

    def pid(self, role: str) -> int:
        return self.pids[role][0]

    def check_alive(self) -> None:
        for child in self.children:
            child.check_alive()

    def snapshot(self) -> dict[str, float]:
        """CPU seconds so far by role; `other` is every process outside the run (noise)."""
        totals: dict[str, float] = {}
        for role, pids in self.pids.items():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                totals[role] = sum(cpu_seconds(pid) for pid in pids)
        totals["other"] = machine_busy_seconds() - sum(totals.values())
        return totals

    async def stop(self, role: str | None = None) -> None:
        chosen = [c for c in self.children if role is None or c.role == role]
        await asyncio.gather(*(c.stop() for c in chosen))
        for child in chosen:
            self.children.remove(child)
            self.pids[child.role].remove(child.pid)


def varz(monitor_port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/varz", timeout=5) as reply:
        raw = json.load(reply)
    return {key: int(raw[key]) for key in ("in_msgs", "out_msgs", "in_bytes", "out_bytes")}


@dataclass
class Usage:
    """What a phase cost: CPU % of one core by role, and server messages and bytes."""

    seconds: float
    cpu: dict[str, float]
    server: dict[str, int]


@contextlib.asynccontextmanager
async def metered(fleet: Fleet, monitor_port: int, into: list[Usage]) -> AsyncIterator[None]:
    cpu, server, started = fleet.snapshot(), varz(monitor_port), time.perf_counter()
    yield
    seconds = time.perf_counter() - started
    cpu_after, server_after = fleet.snapshot(), varz(monitor_port)
    into.append(
        Usage(
            seconds,
            {r: (cpu_after[r] - cpu.get(r, 0.0)) / seconds * 100 for r in cpu_after},
            {k: server_after[k] - server[k] for k in server},
        )
    )


# raw baselines


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Baselines:
    rr_seq_us: list[float]
    rr_pipe_rate: float  # req/s, 100 in flight
    wq_seq_us: list[float]

    @property
    def rr_p50(self) -> float:
        return pct(self.rr_seq_us, 0.5)

    @property
    def wq_p50(self) -> float:
        return pct(self.wq_seq_us, 0.5)

    @property
    def rr_pipe_us(self) -> float:
        """Microseconds per request with 100 in flight (1 / the rate)."""
        return 1e6 / self.rr_pipe_rate


async def request_reply(
    nc: Client, url: str, sizes: Sizes, workdir: Path
) -> tuple[list[float], float]:
    """Cross-process core request-reply to one responder: sequential, then 100 in flight."""
    payload = encode_payload()
    log = workdir / "responder.log"
    responder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RESPONDER, url, stdout=asyncio.subprocess.PIPE, stderr=log.open("wb")
    )
    try:
        assert responder.stdout is not None
        await asyncio.wait_for(responder.stdout.readline(), TIMEOUT_S)
        for _ in range(200):
            await nc.request("benchraw.xecho", payload, timeout=5)
        latencies = []
        for _ in range(sizes.raw_seq):
            started = time.perf_counter_ns()
            await nc.request("benchraw.xecho", payload, timeout=5)
            latencies.append((time.perf_counter_ns() - started) / 1000)
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def one() -> None:
            async with slots:
                await nc.request("benchraw.xecho", payload, timeout=10)

        started_s = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(sizes.raw_pipe)))
        rate = sizes.raw_pipe / (time.perf_counter() - started_s)
        return latencies, rate
    finally:
        responder.terminate()
        await responder.wait()


async def work_queue(nc: Client, sizes: Sizes) -> list[float]:
    """nats_baseline.py's round trip: publish task, pull fetch (10), ack, core reply."""
    js = nc.jetstream()
    payload = encode_payload()
    await js.add_stream(name="BENCHRAW_WORK", subjects=["benchraw.work.>"], retention="workqueue")
    psub = await js.pull_subscribe("benchraw.work.task", durable="workers", stream="BENCHRAW_WORK")
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            try:
                msgs = await psub.fetch(10, timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            for m in msgs:
                await m.ack()
                assert m.headers is not None
                await nc.publish(m.headers["Reply-To"], b'{"output":"ok"}')

    worker_task = asyncio.create_task(worker())
    inbox = nc.new_inbox()
    waiting: dict[str, asyncio.Future[int]] = {}

    async def on_result(msg: Msg) -> None:
        waiting.pop(msg.subject).set_result(time.perf_counter_ns())

    sub = await nc.subscribe(inbox + ".*", cb=on_result)
    latencies = []
    try:
        for i in range(sizes.wq_seq + 100):  # the first 100 warm up
            subject = f"{inbox}.{i}"
            arrived: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            waiting[subject] = arrived
            started = time.perf_counter_ns()
            await js.publish("benchraw.work.task", payload, headers={"Reply-To": subject})
            done = await asyncio.wait_for(arrived, 5)
            if i >= 100:
                latencies.append((done - started) / 1000)
    finally:
        stop.set()
        await worker_task
        await sub.unsubscribe()
        await psub.unsubscribe()
        await js.delete_stream("BENCHRAW_WORK")
    return latencies


def encode_payload() -> bytes:
    # The shape and size of nats_baseline.py's Task (the responders never decode it).
    return json.dumps(
        {"id": "t-0001", "agent": "researcher", "instructions": INSTRUCTIONS, "input": "x" * 880}
    ).encode()


# the Chorus processes


class Deployment:
    """The coordinator, the agents and one orchestrator, on one embedded server."""

    def __init__(self, nats_url: str, fleet: Fleet, nc: Client, workdir: Path) -> None:
        self.nats_url = nats_url
        self.fleet = fleet
        self.nc = nc
        self.workdir = workdir
        self.subjects = Subjects(PREFIX)
        self.env = child_env(nats_url)
        self.spec = workdir / "bencher.yaml"
        self.spec.write_text(SPEC)
        self.instances: list[str] = []
        self.orchestrator_mode = ""
        self.runs = RunClient(nc, self.subjects)

    async def start_coordinator(self) -> None:
        self.fleet.adopt(
            await spawn(
                "coordinator",
                ["-m", "chorus", "coordinator"],
                self.env,
                self.workdir / "coordinator.log",
            )
        )

    async def add_agents(self, n: int) -> None:
        """Start n agent processes; return once each has sent its first heartbeat and the
        coordinator has announced it `up` (so it can be routed to)."""
        names = [f"a{len(self.instances) + i}" for i in range(n)]
        beats = {name: asyncio.get_running_loop().create_future() for name in names}
        ups = {name: asyncio.get_running_loop().create_future() for name in names}

        async def on_beat(msg: Msg) -> None:
            beat = decode(msg.data, Heartbeat)
            if beat.instance in beats and not beats[beat.instance].done():
                beats[beat.instance].set_result(None)

        async def on_status(msg: Msg) -> None:
            change = decode(msg.data, AgentStatusChange)
            if change.instance in ups and change.health == "up" and not ups[change.instance].done():
                ups[change.instance].set_result(None)

        subs = [
            await self.nc.subscribe(self.subjects.all_heartbeats, cb=on_beat),
            await self.nc.subscribe(self.subjects.all_status, cb=on_status),
        ]
        await self.nc.flush(timeout=5)
        try:
            for name in names:
                self.fleet.adopt(
                    await spawn(
                        "agents",
                        ["-m", "chorus", "agent", "run", str(self.spec), "--instance", name],
                        self.env,
                        self.workdir / f"agent-{name}.log",
                    )
                )
            waiting = [*beats.values(), *ups.values()]
            try:
                await asyncio.wait_for(asyncio.gather(*waiting), TIMEOUT_S)
            except TimeoutError:
                self.fleet.check_alive()
                raise RuntimeError("agents not up within 30 s; see the coordinator log") from None
        finally:
            for sub in subs:
                await sub.unsubscribe()
        self.instances += names

    async def use_orchestrator(self, mode: str) -> None:
        """Run one orchestrator: `durable` (steps through the coordinator) or `direct`."""
        if mode == self.orchestrator_mode:
            return
        await self.fleet.stop("orchestrator")
        args = ["-m", "chorus", "orchestrator"] + (["--direct"] if mode == "direct" else [])
        self.fleet.adopt(
            await spawn("orchestrator", args, self.env, self.workdir / f"orchestrator-{mode}.log")
        )
        self.orchestrator_mode = mode
        # The first run waits in the runs queue until the orchestrator takes it: ready.
        await self.run(pipeline(), PIPELINE_INPUT)

    async def run(self, workflow: Pipeline | Parallel, text: str) -> tuple[float, RunRecord]:
        """Submit a run and wait for its final progress message; wall seconds and record."""
        request = RunRequest(workflow=workflow, input=text)
        finished: asyncio.Future[RunProgress] = asyncio.get_running_loop().create_future()

        async def on_progress(msg: Msg) -> None:
            progress = decode(msg.data, RunProgress)
            if progress.kind in FINAL_KINDS and not finished.done():
                finished.set_result(progress)

        sub = await self.nc.subscribe(self.subjects.run_all(request.run_id), cb=on_progress)
        await self.nc.flush(timeout=5)
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
    usage: list[Usage] = field(default_factory=list)

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
    usage: list[Usage] = field(default_factory=list)
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


async def measure_pipeline(
    deployment: Deployment, path: str, sizes: Sizes, monitor_port: int
) -> PipelineFigures:
    await deployment.use_orchestrator(path)
    for _ in range(sizes.warmup_runs):
        await deployment.run(pipeline(), PIPELINE_INPUT)
    walls: list[float] = []
    steps: list[float] = []
    usage: list[Usage] = []
    record: RunRecord | None = None
    async with metered(deployment.fleet, monitor_port, usage):
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


async def measure_parallel(
    deployment: Deployment, path: str, sizes: Sizes, monitor_port: int
) -> ParallelFigures:
    await deployment.use_orchestrator(path)
    usage: list[Usage] = []
    async with metered(deployment.fleet, monitor_port, usage):
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
        len(deployment.instances),
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


# the engine alone: what a step costs the orchestrator itself


class InstantRunner:
    """Answers every task at once, in this process: no agent, no network hop."""

    async def run(self, task: Task) -> Result:
        return Result(
            task_id=task.task_id,
            agent="bencher",
            instance="in-process",
            output=f"[offline] Answer at once.: {task.input}",  # what the offline agent says
            usage=MsgUsage(10, 10, 20),
        )


class MemoryStore:
    """Keeps the encoded record in a dict: the engine's own cost, without the KV round trip."""

    def __init__(self) -> None:
        self.records: dict[str, bytes] = {}

    async def load(self, run_id: str) -> RunRecord | None:
        raw = self.records.get(run_id)
        return decode(raw, RunRecord) if raw is not None else None

    async def save(self, record: RunRecord) -> None:
        self.records[record.run_id] = encode(record)


@dataclass
class EngineFigures:
    label: str
    pipeline_step_us: float  # p50 per step of a 10-step pipeline
    parallel_wall: float  # seconds for the parallel run
    tasks: int

    @property
    def parallel_rate(self) -> float:
        return self.tasks / self.parallel_wall


async def engine_alone(nc: Client, sizes: Sizes) -> tuple[list[EngineFigures], dict[int, float]]:
    """The engine in this process with an instant runner: in-memory store, then the KV
    store with NATS progress (the orchestrator's own store and progress). And the KV
    update latency for the record sizes the runs reach."""
    subjects = Subjects("solo")
    kv_store = await KvRunStore.open(nc.jetstream(), subjects)
    cases: list[tuple[str, RunStore, ProgressSink]] = [
        ("in-memory store, no progress", MemoryStore(), NoProgress()),
        ("KV store + NATS progress (as the orchestrator)", kv_store, NatsProgress(nc, subjects)),
    ]
    figures = []
    for label, store, progress in cases:
        engine = Engine(InstantRunner(), store, progress=progress)
        for _ in range(sizes.warmup_runs):
            await engine.run(new_record(pipeline(), PIPELINE_INPUT))
        per_step = []
        for _ in range(sizes.pipeline_runs):
            started = time.perf_counter()
            await engine.run(new_record(pipeline(), PIPELINE_INPUT))
            per_step.append((time.perf_counter() - started) / STEPS * 1e6)
        started = time.perf_counter()
        record = await engine.run(new_record(parallel(sizes.parallel_tasks), PARALLEL_INPUT))
        wall = time.perf_counter() - started
        if record.status != "completed":
            raise RuntimeError(f"engine alone, {label}: {record.status} {record.error}")
        figures.append(EngineFigures(label, pct(per_step, 0.5), wall, sizes.parallel_tasks))

    # A KV update (compare-and-set, as the run store does) of values of these sizes.
    bucket = kv_store.kv
    latencies: dict[int, float] = {}
    for size in (1024, 27 * 1024, 128 * 1024, 512 * 1024):
        value = b"x" * size
        revision = await bucket.put("size-probe", value)
        samples = []
        for _ in range(20 if size > 100_000 else 200):
            started = time.perf_counter()
            revision = await bucket.update("size-probe", value, last=revision)
            samples.append((time.perf_counter() - started) * 1e6)
        latencies[size] = pct(samples, 0.5)
    return figures, latencies


def engine_table(figures: list[EngineFigures]) -> str:
    rows = [
        [
            f.label,
            f"{f.pipeline_step_us:.0f}",
            f"{f.parallel_wall:.2f}",
            f"{f.parallel_rate:.0f}",
        ]
        for f in figures
    ]
    header = [
        "engine in this process, instant runner",
        "pipeline per step p50 us",
        f"parallel of {figures[0].tasks} wall s",
        "tasks/s",
    ]
    return markdown_table(header, rows)


def kv_size_table(latencies: dict[int, float]) -> str:
    rows = [[f"{size // 1024} KiB", f"{us:.0f}"] for size, us in latencies.items()]
    return markdown_table(["KV update (CAS) of a value of", "p50 us"], rows)


# the traced round: where a step's time goes


Event = tuple[int, str, str, int]  # ns, subject, reply, bytes


class Trace:
    """Messages the tap saw, in wire order, searchable by subject from a position on.

    Messages read in one chunk share a timestamp; their order is the order on the wire.
    """

    def __init__(self, events: list[Event]) -> None:
        self.events = sorted(events, key=lambda e: e[0])  # stable: keeps the wire order
        self.by_subject: dict[str, list[int]] = {}
        for position, event in enumerate(self.events):
            self.by_subject.setdefault(event[1], []).append(position)

    def first(self, subject: str, after: int, *, published: bool = True) -> int | None:
        """Position of the first message on `subject` after position `after`. `published`:
        only what a client published, not JetStream's deliveries of it to a consumer."""
        for position in self.by_subject.get(subject, []):
            if position > after and not (
                published and self.events[position][2].startswith("$JS.ACK.")
            ):
                return position
        return None

    def first_where(self, test: Callable[[str], bool], after: int) -> int | None:
        return next(
            (p for p in range(after + 1, len(self.events)) if test(self.events[p][1])), None
        )

    def answer(self, request: int | None) -> int | None:
        """Position of the reply to a request (the first message on its reply subject)."""
        if request is None or not self.events[request][2]:
            return None
        return self.first(self.events[request][2], request, published=False)

    def time(self, position: int | None) -> int | None:
        return None if position is None else self.events[position][0]


@dataclass
class TracedRun:
    run_id: str
    wall: float


class Marks:
    """The landmark messages of one step, in order: (label, ns), ns None when not seen."""

    def __init__(self, trace: Trace, start: int) -> None:
        self.trace = trace
        self.items: list[tuple[str, int | None]] = [("(step begins)", trace.time(start))]
        self.at = start  # position of the last landmark seen: the next is searched after it
        self.side: dict[str, float] = {}  # gaps off the chain, us

    def add(self, label: str, position: int | None) -> int | None:
        self.items.append((label, self.trace.time(position)))
        if position is not None:
            self.at = position
        return position


def step_marks(trace: Trace, subjects: Subjects, run_id: str, path: str) -> list[Marks]:
    """Each step's landmarks, from the previous step's step_finished (run_started for the
    first) to its own step_finished."""
    key = f"$KV.{subjects.runs_bucket}.{run_id}"
    started_subject = subjects.run_progress(run_id, "step_started")
    finished_subject = subjects.run_progress(run_id, "step_finished")
    previous = trace.first(subjects.run_progress(run_id, "run_started"), -1)
    steps: list[Marks] = []
    if previous is None:
        return steps
    consumer = f"$JS.API.CONSUMER.MSG.NEXT.{subjects.dispatch_stream}."
    for i in range(STEPS):
        tid = task_id(run_id, f"s{i}", 1)
        m = Marks(trace, previous)
        running = m.add("orchestrator: step done → `running` save sent", trace.first(key, m.at))
        m.add("nats-server: `running` save stored, ack sent", trace.answer(running))
        m.add("orchestrator: ack in → step_started sent", trace.first(started_subject, m.at))
        if path == "durable":
            dispatch = m.add(
                "orchestrator: task published to the dispatch stream",
                trace.first(subjects.dispatch(f"cap.{CAPABILITY}"), m.at),
            )
            ack = trace.answer(dispatch)
            if dispatch is not None and ack is not None:
                m.side["task publish → its JetStream ack"] = (
                    trace.events[ack][0] - trace.events[dispatch][0]
                ) / 1000
            request_at = trace.first_where(
                lambda s: s.startswith(f"{PREFIX}.agent.") and s.endswith(".task"), m.at
            )
            pull = trace.first_where(lambda s: s.startswith(consumer), m.at)
            if pull is not None and request_at is not None and pull < request_at:
                m.add("coordinator: task delivered → its next pull request sent", pull)
            request = m.add("coordinator: → task request sent to the agent", request_at)
            m.add("agent: task in → reply sent", trace.answer(request))
            created_subject = f"$KV.{subjects.tasks_bucket}.outcome.{tid}"
            created = m.add(
                "coordinator: reply in → outcome KV create sent",
                trace.first(created_subject, m.at),
            )
            m.add("nats-server: outcome stored, ack sent", trace.answer(created))
            if subjects.outcome(tid) != created_subject:  # announced by a message of its own
                m.add(
                    "coordinator: ack in → outcome announced",
                    trace.first(subjects.outcome(tid), m.at),
                )
        else:
            request = m.add(
                "orchestrator: task request sent to the agent",
                trace.first(subjects.capability_task(CAPABILITY), m.at),
            )
            m.add("agent: task in → reply sent", trace.answer(request))
        done = m.add("orchestrator: result in → `completed` save sent", trace.first(key, m.at))
        m.add("nats-server: `completed` save stored, ack sent", trace.answer(done))
        m.add(
            "orchestrator: ack in → step_finished (and next `running` save) sent",
            trace.first(finished_subject, m.at),
        )
        steps.append(m)
        previous = m.at
    return steps


def trace_table(trace: Trace, subjects: Subjects, runs: list[TracedRun], path: str) -> str:
    """Median time from each landmark to the next, over every step of the traced runs."""
    gaps: dict[str, list[float]] = {}
    side: dict[str, list[float]] = {}
    for run in runs:
        for m in step_marks(trace, subjects, run.run_id, path):
            for (_, before), (label, after) in itertools.pairwise(m.items):
                values = gaps.setdefault(label, [])
                if before is not None and after is not None:
                    values.append((after - before) / 1000)
            for label, value in m.side.items():
                side.setdefault(label, []).append(value)
    rows = [
        [label, f"{statistics.median(values):.0f}" if values else "not seen"]
        for label, values in gaps.items()
    ]
    step_total = sum(statistics.median(v) for v in gaps.values() if v)
    rows.append(["**sum of the medians: one step**", f"**{step_total:.0f}**"])
    rows += [[f"({label})", f"{statistics.median(v):.0f}"] for label, v in side.items()]
    return markdown_table(
        ["gap on the wire, ending when the message named is seen", "median us"], rows
    )


def run_level_table(trace: Trace, subjects: Subjects, runs: list[TracedRun]) -> list[list[str]]:
    """Submit → first step, and last step → run_completed, per traced run (medians)."""
    heads, tails, walls = [], [], []
    for run in runs:
        submitted = trace.time(trace.first(f"$KV.{subjects.runs_bucket}.{run.run_id}", -1))
        started = trace.time(trace.first(subjects.run_progress(run.run_id, "step_started"), -1))
        finished = trace.by_subject.get(subjects.run_progress(run.run_id, "step_finished"), [])
        completed = trace.time(trace.first(subjects.run_progress(run.run_id, "run_completed"), -1))
        if submitted is not None and started is not None:
            heads.append((started - submitted) / 1000)
        if finished and completed is not None:
            tails.append((completed - trace.events[finished[-1]][0]) / 1000)
        walls.append(run.wall * 1e6)
    return [
        [
            "submit (record create) → first step_started",
            f"{statistics.median(heads):.0f}" if heads else "not seen",
        ],
        [
            "last step_finished → run_completed (final record save)",
            f"{statistics.median(tails):.0f}" if tails else "not seen",
        ],
        ["run wall time seen by the submitter (traced)", f"{statistics.median(walls):.0f}"],
    ]


def read_tap(path: Path) -> list[Event]:
    """The messages in a tap file: (ns the chunk holding the message's start arrived,
    subject, reply subject, payload bytes)."""
    raw = path.read_bytes()
    data = bytearray()
    starts: list[tuple[int, int]] = []  # (offset in data, ns)
    at = 0
    while at < len(raw):
        now, size = struct.unpack_from("<QI", raw, at)
        at += 12
        starts.append((len(data), now))
        data += raw[at : at + size]
        at += size
    events: list[Event] = []
    chunk, pos = 0, 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        while chunk + 1 < len(starts) and starts[chunk + 1][0] <= pos:
            chunk += 1
        parts = bytes(data[pos:end]).split()
        pos = end + 2
        if not parts or parts[0] not in (b"MSG", b"HMSG"):
            continue  # PING, PONG, +OK, INFO
        total = int(parts[-1])
        fields = parts[1:-2] if parts[0] == b"HMSG" else parts[1:-1]
        subject, reply = fields[0].decode(), fields[2].decode() if len(fields) > 2 else ""
        events.append((starts[chunk][1], subject, reply, total))
        pos += total + 2
    return events


async def traced_round(
    deployment: Deployment, path: str, sizes: Sizes, workdir: Path
) -> tuple[Trace, list[TracedRun]]:
    await deployment.use_orchestrator(path)
    out = workdir / f"tap-{path}.bin"
    host, port = deployment.nats_url.removeprefix("nats://").rsplit(":", 1)
    tap = await asyncio.create_subprocess_exec(
        sys.executable, "-c", TAP, host, port, str(out), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert tap.stdout is not None
        await asyncio.wait_for(tap.stdout.readline(), TIMEOUT_S)
        runs = []
        for _ in range(sizes.traced_runs):
            wall, record = await deployment.run(pipeline(), PIPELINE_INPUT)
            runs.append(TracedRun(record.run_id, wall))
        await deployment.nc.publish("benchtap.stop", b"")
        await deployment.nc.flush(timeout=5)
        await asyncio.wait_for(tap.wait(), TIMEOUT_S)
    finally:
        if tap.returncode is None:
            tap.kill()
            await tap.wait()
    return Trace(read_tap(out)), runs


# profiling with py-spy


@contextlib.asynccontextmanager
async def profiled(directory: Path, phase: str, targets: dict[str, int]) -> AsyncIterator[None]:
    """py-spy each target process (role -> pid) for the duration of the block."""
    spies: list[tuple[str, Path, asyncio.subprocess.Process]] = []
    for role, pid in targets.items():
        out = directory / f"{phase}-{role}.txt"
        spy = await asyncio.create_subprocess_exec(
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--function",
            "--nonblocking",
            "--rate",
            "250",
            "--output",
            str(out),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        spies.append((role, out, spy))
    await asyncio.sleep(0.5)  # py-spy attaches asynchronously; give it a moment
    try:
        yield
    finally:
        for _, _, spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for role, out, spy in spies:
            await asyncio.wait_for(spy.wait(), TIMEOUT_S)
            if out.exists():
                print(f"\n#### py-spy: {phase}, {role} ({out})\n")
                print(summarise_profile(out.read_text()))


def summarise_profile(raw: str, top: int = 15) -> str:
    """Where a process spends its on-CPU samples, from py-spy's raw (folded) output.

    Self time per function, then inclusive time of the Chorus and nats-py functions (the
    event loop's own frames, which contain everything, are left out).
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "(no samples)"

    def interesting(frame: str) -> bool:
        return ("chorus/" in frame or "nats/" in frame or "msgspec" in frame) and (
            inclusive[frame] < 0.97 * total
        )

    rows = [[f"`{f}`", f"{n / total:.1%}"] for f, n in own.most_common(top)]
    lines = [f"{total} on-CPU samples", "", markdown_table(["function (self)", "share"], rows)]
    ranked = sorted((f for f in inclusive if interesting(f)), key=lambda f: -inclusive[f])
    rows = [[f"`{f}`", f"{inclusive[f] / total:.1%}"] for f in ranked[:top]]
    lines += ["", markdown_table(["Chorus / nats-py function (inclusive)", "share"], rows)]
    return "\n".join(lines)


async def profile_rounds(
    deployment: Deployment, sizes: Sizes, directory: Path, monitor_port: int
) -> None:
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
            f"{base.rr_p50:.0f}",
            f"{pct(base.rr_seq_us, 0.99):.0f}",
            f"{1e6 / statistics.mean(base.rr_seq_us):.0f} req/s",
        ],
        [
            f"cross-process core request-reply, {IN_FLIGHT} in flight",
            f"{base.rr_pipe_us:.0f} per request",
            "",
            f"{base.rr_pipe_rate:.0f} req/s",
        ],
        [
            "JetStream work-queue round trip (publish, pull fetch, ack, core reply), sequential",
            f"{base.wq_p50:.0f}",
            f"{pct(base.wq_seq_us, 0.99):.0f}",
            f"{1e6 / statistics.mean(base.wq_seq_us):.0f} req/s",
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
                f"{f.usage[0].server['in_msgs'] / (len(f.walls) * STEPS):.1f}",
                cpu_text(f.usage[0]),
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
                f"{f.usage[0].server['in_bytes'] / 2**20:.0f}",
                f"{min(shares)}-{max(shares)}",
                cpu_text(f.usage[0]),
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


def environment_lines(command: str) -> list[str]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    server = subprocess.run(
        [find_binary(), "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    packages = ", ".join(f"{name} {version(name)}" for name in ("nats-py", "msgspec"))
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return [
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- code: {commit or 'unknown'}",
        f"- machine: {cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}; {packages}; {server}",
        f"- command: `{command}`",
    ]


# main


async def main_async(args: argparse.Namespace) -> int:
    sizes = SMOKE if args.smoke else DEFAULT
    if args.runs:
        sizes = Sizes(**{**sizes.__dict__, "pipeline_runs": args.runs})
    profile_dir: Path | None = args.profile
    if profile_dir is not None and shutil.which("py-spy") is None:
        sys.exit("--profile needs py-spy: pip install py-spy")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="chorus-orch-") as tmp:
        workdir = args.keep or Path(tmp)
        with contextlib.closing(__import__("socket").socket()) as probe:
            probe.bind(("127.0.0.1", 0))
            monitor_port = probe.getsockname()[1]
        server = NatsServer(workdir / "jetstream", monitor_port=monitor_port).start()
        fleet = Fleet()
        assert server.pid is not None
        fleet.add("nats-server", server.pid)
        fleet.add("bench", os.getpid())
        nc = await connect(Settings(nats_url=server.url, prefix=PREFIX), "bench")
        deployment = Deployment(server.url, fleet, nc, workdir)
        try:
            print("  raw baselines", file=sys.stderr)
            rr_seq, rr_rate = await request_reply(nc, server.url, sizes, workdir)
            base = Baselines(rr_seq, rr_rate, await work_queue(nc, sizes))

            print("  starting the coordinator and one agent", file=sys.stderr)
            await deployment.start_coordinator()
            await deployment.add_agents(1)
            pipelines = [
                await measure_pipeline(deployment, path, sizes, monitor_port)
                for path in ("durable", "direct")
            ]
            traces = {
                path: await traced_round(deployment, path, sizes, workdir)
                for path in ("direct", "durable")
            }

            print(f"  starting {sizes.parallel_agents - 1} more agents", file=sys.stderr)
            await deployment.add_agents(sizes.parallel_agents - 1)
            by_path: dict[str, list[ParallelFigures]] = {"durable": [], "direct": []}
            for _ in range(sizes.parallel_runs):  # alternated, so drift touches both alike
                for path, path_runs in by_path.items():
                    path_runs.append(await measure_parallel(deployment, path, sizes, monitor_port))
            parallels = [median_run(path_runs) for path_runs in by_path.values()]
            print("  the engine alone", file=sys.stderr)
            engine_figures, kv_latencies = await engine_alone(nc, sizes)
            load_after = os.getloadavg()

            command = " ".join(["python bench/orchestration.py", *sys.argv[1:]])
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
                print(trace_table(trace, deployment.subjects, runs, path))
                print()
                print(
                    markdown_table(
                        ["per run", "median us"], run_level_table(trace, deployment.subjects, runs)
                    )
                )
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
            if profile_dir is not None:
                await profile_rounds(deployment, sizes, profile_dir, monitor_port)
            elif not all_met:
                print(
                    "\nA target was missed: run with `--profile DIR` (pip install py-spy) to "
                    "see where the orchestrator's and the coordinator's CPU goes."
                )
        finally:
            await fleet.stop()
            await nc.close()
            server.stop()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--runs", type=int, default=0, help="pipeline runs per path (default 20)")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="after the measured rounds, py-spy each phase again and print where the CPU goes",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the process logs, traces and server store in DIR (default: a temp dir)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for directory in (args.profile, args.keep):
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
