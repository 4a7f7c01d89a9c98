"""How `chorus run` shows a run as it goes: a live view for terminals, plain lines otherwise.

Both show the running steps' text as the agents write it (their live output): the live view
under each running step, the plain lines as whole lines of text per step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol, TextIO

from chorus.cli.live import StepLines
from chorus.cli.text import one_line
from chorus.cli.times import iso
from chorus.client.streams import LiveText
from chorus.messages import RunFields, RunHead, RunProgress, RunRecord, StreamChunk
from chorus.messages.runs import step_counts
from chorus.specs.workflow import WorkflowSpec, expected_steps
from chorus.workflows.progress import FINAL_KINDS

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.spinner import Spinner

STATUS_STYLE: Final = {
    "pending": "dim",
    "running": "cyan",
    "waiting": "magenta",
    "completed": "green",
    "failed": "red",
    "cancelled": "yellow",
    "skipped": "dim",
}
MARKS: Final = {"completed": "✓", "failed": "✗", "skipped": "-", "cancelled": "✗", "pending": "·"}
SAID_CHARS: Final = 70  # of a running step's latest text in the live view
# progress kind that ends a step -> the step status it means, and back
STEP_ENDS: Final = {
    "step_finished": "completed",
    "step_failed": "failed",
    "step_skipped": "skipped",
}
END_KINDS: Final = {
    "completed": "step_finished",
    "failed": "step_failed",
    "skipped": "step_skipped",
    "cancelled": "step_cancelled",
}


def steps_done(record: RunRecord | RunHead) -> str:
    """`done/total` steps, from a whole record or from a head's summary (`step_counts`)."""
    done, total = step_counts(record)
    return f"{done}/{total}"


def duration(record: RunFields) -> str:
    if not record.started_at:
        return "-"
    seconds = (record.ended_at or time.time()) - record.started_at
    return seconds_text(seconds) + ("" if record.ended_at else "…")


def seconds_text(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)}m {int(seconds % 60)}s"


def clock(timestamp: float) -> str:
    """A time the CLI prints: ISO 8601 UTC with milliseconds (`-` for none)."""
    return iso(timestamp)


when = clock


def short(text: str, width: int = 80) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


class Display(Protocol):
    def show(self, progress: RunProgress) -> None: ...

    def text(self, chunk: StreamChunk) -> None: ...

    def close(self, record: RunRecord | None) -> None: ...


class PlainProgress:
    """One line per progress event: for pipes, logs and CI."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.ended: set[str] = set()  # steps whose end was shown
        self.said = StepLines(lambda step, text: self.line(time.time(), "text", step, text))

    def line(self, at: float, kind: str, step: str, detail: str) -> None:
        where = f"{one_line(step)}: " if step else ""
        shown = one_line(short(detail, 200))
        print(f"{clock(at)} {one_line(kind):<14} {where}{shown}", file=self.stream, flush=True)

    def show(self, progress: RunProgress) -> None:
        if progress.kind in STEP_ENDS or progress.kind in FINAL_KINDS:
            self.ended.add(progress.step or progress.kind)
        self.line(progress.time, progress.kind, progress.step, progress.detail)

    def text(self, chunk: StreamChunk) -> None:
        self.said.show(chunk)

    def close(self, record: RunRecord | None) -> None:
        # Progress is fire-and-forget: a step whose end we did not hear of is told from the
        # record, which is the account that matters.
        for step in record.steps if record is not None else []:
            kind = END_KINDS.get(step.status)
            if kind is not None and step.name not in self.ended:
                detail = step.error or f"{step.agent} in {step.duration_ms:.0f} ms"
                self.line(step.ended_at, kind, step.name, detail)
        if record is not None and record.finished and f"run_{record.status}" not in self.ended:
            self.line(record.ended_at, f"run_{record.status}", "", record.error or record.output)


@dataclass
class StepView:
    status: str = "running"
    detail: str = ""
    started: float = field(default_factory=time.time)
    ended: float = 0.0
    spinner: Spinner | None = None
    said: str = ""  # what its agent is writing (live output)


class LiveProgress:
    """A line per step with a spinner, mark and time, under a bar of the run: for terminals."""

    def __init__(self, console: Console, workflow: WorkflowSpec, run_id: str) -> None:
        from rich.live import Live

        self.workflow = workflow
        self.run_id = run_id
        self.total = expected_steps(workflow)
        self.steps: dict[str, StepView] = {}
        self.notes: list[str] = []  # plan, events, retries: the latest few are shown
        self.texts = LiveText()
        self.status = "pending"
        self.live = Live(console=console, get_renderable=self.render, refresh_per_second=8)
        self.live.start()

    def show(self, progress: RunProgress) -> None:
        kind, name = progress.kind, progress.step
        if kind in ("run_started", "run_resumed"):
            self.status = "running"
        elif kind.startswith("run_"):
            self.status = kind.removeprefix("run_")
        elif kind == "step_started":
            self.steps[name] = StepView(detail=progress.detail, started=progress.time)
        elif kind in STEP_ENDS:
            view = self.steps.setdefault(name, StepView(started=progress.time))
            view.status, view.detail, view.ended = STEP_ENDS[kind], progress.detail, progress.time
        elif kind == "plan_ready":
            subtasks = [s for s in progress.detail.split(", ") if s]
            self.total = len(subtasks) + 2  # plan, the subtasks, compile
            self.notes.append(f"plan: {progress.detail}")
        elif kind == "event_seen":
            self.notes.append(f"event {name} from {progress.detail or '?'}")
        elif kind == "step_retry":
            self.notes.append(f"{name} retrying: {progress.detail}")
        self.live.refresh()

    def text(self, chunk: StreamChunk) -> None:
        # Drawn at the next refresh (8 a second), not once per chunk.
        self.texts.add(chunk)
        shown, view = self.texts.current(chunk.task_id), self.steps.get(chunk.task_id)
        if shown is not None and view is not None:  # the step's latest attempt
            view.said = f"[{shown.tool}] " if shown.tool else ""
            view.said += " ".join(shown.text.split())[-SAID_CHARS:]

    def close(self, record: RunRecord | None) -> None:
        if record is not None:  # the record is the account: show every step as it ended
            self.status = record.status
            if record.plan is not None:
                self.total = len(record.plan.subtasks) + 2
            for step in record.steps:
                view = self.steps.setdefault(step.name, StepView(started=step.started_at))
                view.status, view.ended = step.status, step.ended_at
                if step.status == "completed":
                    view.detail = f"{step.agent} in {step.duration_ms:.0f} ms"
                elif step.error:
                    view.detail = step.error
        self.live.update(self.render(), refresh=True)
        self.live.stop()

    def render(self) -> RenderableType:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.spinner import Spinner
        from rich.table import Table
        from rich.text import Text

        done = sum(v.status in ("completed", "skipped") for v in self.steps.values())
        total = max(self.total or 0, len(self.steps))
        head = Table.grid(padding=(0, 1))
        style = STATUS_STYLE.get(self.status, "white")
        head.add_row(
            Text(one_line(self.workflow.name), style="bold"),
            ProgressBar(total=total or None, completed=done, width=30),
            Text(f"{done}/{total if self.total is not None else '?'} steps"),
            Text(self.status, style=style),
            Text(f"run {one_line(self.run_id[:12])}", style="dim"),
        )
        steps = Table.grid(padding=(0, 1))
        now = time.time()
        for name, view in self.steps.items():
            mark: RenderableType
            if view.status == "running":
                view.spinner = view.spinner or Spinner("dots", style="cyan")
                mark = view.spinner
            else:
                mark = Text(MARKS.get(view.status, "?"), style=STATUS_STYLE.get(view.status, ""))
            # A finished step's detail says how long it took; a running one's time counts up.
            took = (view.ended or now) - view.started if view.started else 0.0
            clock_text = "" if view.status == "completed" else seconds_text(max(took, 0.0))
            # A running step shows what its agent is writing, once it writes.
            if view.status == "running" and view.said:
                detail = Text(one_line(short(view.said, SAID_CHARS)), style="italic")
            else:
                detail = Text(one_line(short(view.detail, 70)))
            steps.add_row(
                mark, Text(one_line(name), style="bold"), detail, Text(clock_text, style="dim")
            )
        notes = [Text(one_line(short(note, 100)), style="dim") for note in self.notes[-4:]]
        return Group(head, steps, *notes)
