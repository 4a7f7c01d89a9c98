"""The engine alone, for `bench.orchestration`: what a workflow step costs the orchestrator
itself, without an agent or a network hop for the task.

`Engine` in the bench process with a runner that answers at once, per pipeline step and for
the parallel run, with an in-memory store (the engine's own Python) and with the KV store and
NATS progress the orchestrator uses; and the KV update latency for the record sizes the runs
reach. Imported by `bench.orchestration`; not a script of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client

from bench.harness.stats import pct
from bench.harness.tables import markdown_table
from chorus.client.runstore import KvRunStore
from chorus.messages import Event, Result, RunRecord, StepRecord, Task, decode, encode
from chorus.messages import Usage as MsgUsage
from chorus.specs.workflow import Parallel, Pipeline
from chorus.subjects import Subjects
from chorus.workflows.engine import Engine, new_record
from chorus.workflows.progress import NatsProgress, NoProgress
from chorus.workflows.protocols import ProgressSink, RunStore


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
    """Keeps each encoded part (head, steps, events) in a dict: the engine's own cost,
    without the KV round trip."""

    def __init__(self) -> None:
        self.records: dict[str, bytes] = {}
        self.steps: dict[str, dict[int, bytes]] = {}

    async def load(self, run_id: str) -> RunRecord | None:
        raw = self.records.get(run_id)
        if raw is None:
            return None
        record = decode(raw, RunRecord)
        steps = self.steps.get(run_id, {})
        record.steps = [decode(steps[i], StepRecord) for i in sorted(steps)]
        return record

    async def save(self, record: RunRecord) -> None:
        self.records[record.run_id] = encode(record)

    async def save_step(self, run_id: str, index: int, step: StepRecord) -> None:
        self.steps.setdefault(run_id, {})[index] = encode(step)

    async def add_event(self, run_id: str, index: int, event: Event) -> None:
        self.steps.setdefault(f"{run_id}.events", {})[index] = encode(event)


@dataclass
class EngineFigures:
    label: str
    pipeline_step_us: float  # p50 per step of a 10-step pipeline
    parallel_wall: float  # seconds for the parallel run
    tasks: int

    @property
    def parallel_rate(self) -> float:
        return self.tasks / self.parallel_wall


async def engine_alone(
    nc: Client,
    pipeline: Callable[[], Pipeline],
    pipeline_input: str,
    parallel: Callable[[], Parallel],
    parallel_input: str,
    *,
    warmup: int,
    runs: int,
) -> tuple[list[EngineFigures], dict[int, float]]:
    """The engine in this process with an instant runner: in-memory store, then the KV
    store with NATS progress (the orchestrator's own store and progress). And the KV
    update latency for the record sizes the runs reach."""
    subjects = Subjects("solo")
    kv_store = await KvRunStore.open(nc.jetstream(), subjects)
    cases: list[tuple[str, RunStore, ProgressSink]] = [
        ("in-memory store, no progress", MemoryStore(), NoProgress()),
        ("KV store + NATS progress (as the orchestrator)", kv_store, NatsProgress(nc, subjects)),
    ]
    steps, tasks = len(pipeline().steps), len(parallel().tasks)
    figures = []
    for label, store, progress in cases:
        engine = Engine(InstantRunner(), store, progress=progress)
        for _ in range(warmup):
            await engine.run(new_record(pipeline(), pipeline_input))
        per_step = []
        for _ in range(runs):
            started = time.perf_counter()
            await engine.run(new_record(pipeline(), pipeline_input))
            per_step.append((time.perf_counter() - started) / steps * 1e6)
        started = time.perf_counter()
        record = await engine.run(new_record(parallel(), parallel_input))
        wall = time.perf_counter() - started
        if record.status != "completed":
            raise RuntimeError(f"engine alone, {label}: {record.status} {record.error}")
        figures.append(EngineFigures(label, pct(per_step, 0.5), wall, tasks))

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
