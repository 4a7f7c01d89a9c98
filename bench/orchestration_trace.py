"""The traced round of `bench.orchestration`: where a pipeline step's time goes.

While a few pipeline runs go through, the tap (`bench.harness.tap`) records every message on
the wire; each step's landmarks (the run record's saves and their acks, progress, the task's
publish, the coordinator's pull request and its request to the agent, the reply, the
outcome's KV create) are found in order, and the median gap between consecutive landmarks
shows which process the step was waiting for. Imported by `bench.orchestration`; not a
script of its own.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass

from bench.harness.tables import markdown_table
from bench.harness.tap import Trace
from chorus.subjects import Subjects
from chorus.workflows.run import task_id


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


def step_marks(
    trace: Trace, subjects: Subjects, run_id: str, path: str, steps: int, capability: str
) -> list[Marks]:
    """Each step's landmarks, from the previous step's step_finished (run_started for the
    first) to its own step_finished."""
    key = f"$KV.{subjects.runs_bucket}.{run_id}"
    started_subject = subjects.run_progress(run_id, "step_started")
    finished_subject = subjects.run_progress(run_id, "step_finished")
    previous = trace.first(subjects.run_progress(run_id, "run_started"), -1)
    marks: list[Marks] = []
    if previous is None:
        return marks
    consumer = f"$JS.API.CONSUMER.MSG.NEXT.{subjects.dispatch_stream}."
    for i in range(steps):
        tid = task_id(run_id, f"s{i}", 1)
        m = Marks(trace, previous)
        running = m.add("orchestrator: step done → `running` save sent", trace.first(key, m.at))
        m.add("nats-server: `running` save stored, ack sent", trace.answer(running))
        m.add("orchestrator: ack in → step_started sent", trace.first(started_subject, m.at))
        if path == "durable":
            dispatch = m.add(
                "orchestrator: task published to the dispatch stream",
                trace.first(subjects.dispatch(f"cap.{capability}"), m.at),
            )
            ack = trace.answer(dispatch)
            if dispatch is not None and ack is not None:
                m.side["task publish → its JetStream ack"] = (
                    trace.events[ack].at - trace.events[dispatch].at
                ) / 1000
            request_at = trace.first_where(
                lambda s: s.startswith(f"{subjects.prefix}.agent.") and s.endswith(".task"), m.at
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
                trace.first(subjects.capability_task(capability), m.at),
            )
            m.add("agent: task in → reply sent", trace.answer(request))
        done = m.add("orchestrator: result in → `completed` save sent", trace.first(key, m.at))
        m.add("nats-server: `completed` save stored, ack sent", trace.answer(done))
        m.add(
            "orchestrator: ack in → step_finished (and next `running` save) sent",
            trace.first(finished_subject, m.at),
        )
        marks.append(m)
        previous = m.at
    return marks


def trace_table(
    trace: Trace, subjects: Subjects, runs: list[TracedRun], path: str, steps: int, capability: str
) -> str:
    """Median time from each landmark to the next, over every step of the traced runs."""
    gaps: dict[str, list[float]] = {}
    side: dict[str, list[float]] = {}
    for run in runs:
        for m in step_marks(trace, subjects, run.run_id, path, steps, capability):
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
            tails.append((completed - trace.events[finished[-1]].at) / 1000)
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
