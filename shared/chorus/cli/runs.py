"""`chorus run` (run a workflow file, with live progress) and `chorus runs` (list, show, cancel,
respond to a human step, steer)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, get_args

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.cli import times, wire
from chorus.cli.live import drain, follow_chunks
from chorus.cli.run_progress import (
    STATUS_STYLE,
    Display,
    LiveProgress,
    PlainProgress,
    clock,
    duration,
    seconds_text,
    short,
    steps_done,
    when,
)
from chorus.cli.text import for_stream, plain, safe
from chorus.cli.usage import budget_text, dollars, spend_text
from chorus.client import ChorusClient
from chorus.client.runs import RunClient
from chorus.config import Settings
from chorus.errors import ConfigError, InvalidMessage, NotFound, RequestTimeout
from chorus.messages import (
    RunHead,
    RunProgress,
    RunRecord,
    RunRequest,
    RunStatus,
    decode,
    encode,
)
from chorus.nats.connection import connect
from chorus.specs.budget import RunBudget
from chorus.specs.workflow import WorkflowSpec, find_workflow, load_workflow
from chorus.subjects import check_token

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.table import Table

DEFAULT_TIMEOUT: Final = 600.0


class ExamplesFormatter(argparse.HelpFormatter):
    """Wraps the description to the terminal, keeps the examples of the epilog line by line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def register(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="run a workflow file and follow its progress",
        description="Submit a workflow run and follow it step by step until it ends. FILE is a "
        "workflow YAML file, or the name of a stored workflow (CHORUS_WORKFLOWS, then the "
        "examples). An orchestrator must be running (chorus orchestrator, or chorus up). "
        "Exit status: 0 completed, 1 failed or cancelled, 2 on a usage error, a wrong "
        "workflow file, or when the run did not end within --timeout (it goes on).",
        epilog="examples:\n"
        "  chorus run report.yaml 'What makes NATS a good fit for agents?'\n"
        '  chorus run report.yaml @question.txt --data \'{"audience": "ops"}\'\n'
        "  echo 'Compare JetStream and Kafka' | chorus run research-report -\n"
        "  chorus run report.yaml 'q' --detach      # print the run id, do not wait\n"
        "  chorus run report.yaml 'q' --json | jq .output",
        formatter_class=ExamplesFormatter,
    )
    run.add_argument("file", metavar="FILE", help="workflow file, or a stored workflow's name")
    run.add_argument("input", metavar="INPUT", nargs="?", help="input text, @file, or - for stdin")
    run.add_argument("--data", help="structured input as JSON (or @file): conditions read it")
    run.add_argument("--detach", action="store_true", help="print the run id and exit at once")
    run.add_argument(
        "--timeout",
        type=_positive(float),
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for the run to end (default {DEFAULT_TIMEOUT:g})",
    )
    run.add_argument("--json", action="store_true", help="print the finished run record as JSON")
    run.add_argument(
        "--budget-tokens",
        type=_positive(int),
        help="most tokens the run may spend (instead of the workflow's budget)",
    )
    run.add_argument("--budget-usd", type=_positive(float), help="most dollars it may spend")
    run.add_argument(
        "--budget-policy",
        choices=["stop", "wrap_up"],
        help="when the budget is spent: fail the run (stop, the default) or give the agent "
        "one last turn without tools and end there (wrap_up)",
    )
    run.set_defaults(func=run_workflow)

    runs = sub.add_parser(
        "runs",
        help="list recent runs; show or cancel one",
        description="List the most recent workflow runs (KV bucket <prefix>-runs). A run id "
        "may be shortened to a unique prefix of at least 4 characters. An unknown id is an "
        "error (exit 2).",
        epilog="examples:\n  chorus runs --limit 10\n  chorus runs show 3f2a9c\n"
        "  chorus runs show 3f2a9c --json | jq .steps\n  chorus runs cancel 3f2a9c",
        formatter_class=ExamplesFormatter,
    )
    runs.add_argument("--limit", type=_positive(int), default=20, help="how many runs (default 20)")
    runs.add_argument("--json", action="store_true", help="print the run records as JSON")
    runs.add_argument(
        "--status",
        action="append",
        choices=get_args(RunStatus),
        default=[],
        help="only runs with this status; repeatable",
    )
    runs.add_argument("--workflow", default="", metavar="NAME", help="only runs of this workflow")
    runs.add_argument(
        "--since",
        type=times.since,
        default=0.0,
        metavar="WHEN",
        help="only runs submitted since WHEN: an ISO 8601 time (UTC unless it says) or a "
        "duration before now, like 10m, 2h, 1d",
    )
    runs.set_defaults(func=list_runs)
    actions = runs.add_subparsers(dest="runs_command", metavar="[ACTION]")
    show = actions.add_parser(
        "show",
        help="one run: steps, plan, events, output",
        description="Show one run: its steps (status, agent and instance, attempts, duration, "
        "error or output), the plan of a hierarchical run, the chain of events of an event "
        "run, and the output.",
        epilog="example: chorus runs show 3f2a9c --json",
        formatter_class=ExamplesFormatter,
    )
    show.add_argument("run_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print the run record as JSON")
    show.set_defaults(func=show_run)
    cancel = actions.add_parser(
        "cancel",
        help="cancel a queued or running run",
        description="Cancel a run: a queued one at once, a running one by asking its "
        "orchestrator, then wait until the run record says it stopped. Exit status 0 when it "
        "was cancelled, 1 when it had already finished or did not stop in time.",
        epilog="example: chorus runs cancel 3f2a9c",
        formatter_class=ExamplesFormatter,
    )
    cancel.add_argument("run_id", metavar="ID")
    cancel.add_argument(
        "--timeout", type=_positive(float), default=10.0, help="seconds to wait (default 10)"
    )
    cancel.set_defaults(func=cancel_run)
    register_control(actions)


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
        return value

    return parse


# reading the command line


def workflow_of(argument: str, settings: Settings) -> WorkflowSpec:
    """A workflow file, or (a bare word that is no file) the name of a stored workflow."""
    path = Path(argument)
    if path.exists() or path.suffix in (".yaml", ".yml", ".json") or "/" in argument:
        return load_workflow(path)
    return find_workflow(argument, settings.workflow_dirs)


def text_of(argument: str | None) -> str:
    # A file or stdin usually ends in a newline that is no part of the question.
    return wire.read_payload(argument).decode(errors="replace").rstrip("\n")


def data_of(argument: str | None) -> Any:
    if argument is None:
        return None
    try:
        return json.loads(wire.read_payload(argument))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--data is not JSON: {exc}") from None


def budget_of(args: argparse.Namespace, workflow: WorkflowSpec) -> RunBudget | None:
    """The run's budget from --budget-*, on top of the workflow's; None: the workflow's."""
    given = {
        "tokens": args.budget_tokens,
        "usd": args.budget_usd,
        "policy": args.budget_policy,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    base = msgspec.to_builtins(workflow.budget) if workflow.budget else {}
    try:
        return msgspec.convert({**base, **given}, RunBudget)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"--budget-*: {exc}") from None


def record_json(record: RunRecord | list[RunHead]) -> str:
    return msgspec.json.format(encode(record), indent=2).decode()


# following a run


async def run_workflow(args: argparse.Namespace, settings: Settings) -> int:
    # Everything the user gave is checked before anything is sent.
    workflow = workflow_of(args.file, settings)
    request = RunRequest(
        workflow=workflow,
        input=text_of(args.input),
        data=data_of(args.data),
        budget=budget_of(args, workflow),
    )
    nc = await connect(settings, "chorus-run")
    try:
        runs = RunClient(nc, settings.subjects, workflow_dirs=settings.workflow_dirs)
        if args.detach:
            await runs.submit(request)
            print(request.run_id)
            return 0
        record = await follow(args, settings, nc, runs, request)
    finally:
        await nc.close()
    if record is None:
        return 130
    if args.json:
        print(record_json(record))
    else:
        print_result(record)
    return 0 if record.status == "completed" else 1


def display_for(args: argparse.Namespace, workflow: WorkflowSpec, run_id: str) -> Display:
    # With --json, stdout is for the record alone: progress goes to stderr.
    stream = sys.stderr if args.json else sys.stdout
    if not stream.isatty():
        return PlainProgress(stream)
    from rich.console import Console

    return LiveProgress(Console(file=stream, highlight=False), workflow, run_id)


async def follow(
    args: argparse.Namespace, settings: Settings, nc: Client, runs: RunClient, request: RunRequest
) -> RunRecord | None:
    """Show the run's progress until it ends; None when the user stopped following (Ctrl-C)."""
    assert request.workflow is not None
    display = display_for(args, request.workflow, request.run_id)
    record: RunRecord | None = None

    async def on_progress(msg: Msg) -> None:
        # A message on the run's subjects that is not progress is not ours to draw.
        with contextlib.suppress(InvalidMessage):
            display.show(decode(msg.data, RunProgress))

    # Subscribed before submitting, so no progress of the run is missed.
    subscription = await nc.subscribe(settings.subjects.run_all(request.run_id), cb=on_progress)
    # The steps' text as their agents write it (a JetStream reader misses nothing anyway).
    chunks = ChorusClient(nc, settings.subjects).stream(
        request.run_id, max_age_s=settings.stream_max_age
    )
    await chunks.open()
    showing = asyncio.create_task(follow_chunks(chunks, display.text))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await nc.flush(timeout=5)
        await runs.submit(request)
        # The run record in KV says when the run ended; progress messages only draw it.
        waiting = asyncio.create_task(runs.wait(request.run_id, args.timeout))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiting, stopping):
                task.cancel()
            await asyncio.gather(waiting, stopping, return_exceptions=True)
        if waiting.cancelled():
            print(
                f"stopped following run {request.run_id}; it goes on: "
                f"`chorus runs show {request.run_id}`, `chorus runs cancel {request.run_id}`",
                file=sys.stderr,
            )
            return None
        try:
            record = waiting.result()
            await _stop_showing(showing)
            await drain(chunks, display.text)  # the run is over: every chunk is stored
        except RequestTimeout:
            current = await runs.get(request.run_id)
            if current.status == "pending":
                raise RequestTimeout(
                    f"run {request.run_id} is still queued after {args.timeout:g}s: no "
                    "orchestrator took it. It stays queued and runs when one starts: start "
                    "`chorus orchestrator` (or `chorus up`), or cancel it with "
                    f"`chorus runs cancel {request.run_id}`"
                ) from None
            raise
        return record
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        showing.cancel()
        await asyncio.gather(showing, return_exceptions=True)  # what it met is told above
        await chunks.close()
        await subscription.unsubscribe()
        display.close(record)


async def _stop_showing(showing: asyncio.Task[None]) -> None:
    showing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await showing


def print_result(record: RunRecord) -> None:
    from rich.console import Console

    if record.output:
        print(for_stream(record.output, sys.stdout))
    console = Console(highlight=False, soft_wrap=True)
    style = STATUS_STYLE.get(record.status, "white")
    console.print(
        f"[{style}]{record.status}[/] run {safe(record.run_id)} · {safe(record.workflow.name)} "
        f"({record.kind}) · {steps_done(record)} steps · {record.usage.total_tokens} tokens · "
        f"{dollars(record.usage.usd)} · {duration(record)}"
    )
    if record.error:
        print(f"chorus: run {record.status}: {plain(record.error)}", file=sys.stderr)


# runs


async def find_run(runs: RunClient, run_id: str) -> RunRecord:
    """The run with this id, or with the only id that starts with it (4 characters or more)."""
    check_token(run_id, "run id")
    try:
        return await runs.get(run_id)
    except NotFound:
        if len(run_id) < 4:
            raise NotFound(f"no run {run_id!r}; `chorus runs` lists the recent ones") from None
    matches = await runs.find(run_id)
    if len(matches) == 1:
        return await runs.get(matches[0])
    if matches:
        raise NotFound(
            f"run id {run_id!r} is ambiguous: {len(matches)} runs start with it "
            f"({', '.join(matches[:3])}{', ...' if len(matches) > 3 else ''}); give more of it"
        )
    raise NotFound(f"no run {run_id!r}; `chorus runs` lists the recent ones")


def _console() -> Console:
    from rich.console import Console

    # Piped output is not cut to 80 columns: scripts and logs get whole rows.
    return Console(highlight=False) if sys.stdout.isatty() else Console(highlight=False, width=200)


def runs_table(records: list[RunHead]) -> Table:
    from rich.table import Table

    view = Table(title="runs, most recent first", title_justify="left")
    columns = ("run", "workflow", "kind", "status", "steps", "started", "duration", "tokens", "usd")
    for column in columns:
        view.add_column(column, justify="right" if column in ("steps", "tokens", "usd") else "left")
    for record in records:
        style = STATUS_STYLE.get(record.status, "white")
        view.add_row(
            safe(record.run_id[:12]),
            safe(record.workflow_name),
            record.kind,
            f"[{style}]{record.status}[/]",
            steps_done(record),
            when(record.started_at or record.created_at),
            duration(record),
            str(record.usage.total_tokens),
            dollars(record.usage.usd),
        )
    return view


async def list_runs(args: argparse.Namespace, settings: Settings) -> int:
    nc = await connect(settings, "chorus-runs")
    try:
        records = await RunClient(nc, settings.subjects, workflow_dirs=settings.workflow_dirs).list(
            args.limit, statuses=args.status, workflow=args.workflow, since=args.since
        )
    finally:
        await nc.close()
    if args.json:
        print(record_json(records))
    elif not records and (args.status or args.workflow or args.since):
        print("no runs match: see them all with `chorus runs`")
    elif not records:
        print("no runs yet: start one with `chorus run FILE INPUT`")
    else:
        _console().print(runs_table(records))
    return 0


def run_view(record: RunRecord) -> list[RenderableType]:
    from rich.table import Table

    style = STATUS_STYLE.get(record.status, "white")
    head = Table.grid(padding=(0, 2))
    for label, value in (
        ("run", safe(record.run_id)),
        ("workflow", f"{safe(record.workflow.name)} ({record.kind})"),
        ("status", f"[{style}]{record.status}[/]"),
        ("submitted", when(record.created_at)),
        ("started", when(record.started_at)),
        ("ended", when(record.ended_at)),
        ("duration", duration(record)),
        ("spend", spend_text(record.usage)),
        *((f"  {safe(model)}", spend_text(u)) for model, u in sorted(record.by_model.items())),
        ("budget", safe(budget_text(record) or "none")),
        ("input", safe(short(record.input, 120))),
    ):
        head.add_row(f"[bold]{label}[/]", value)
    parts: list[RenderableType] = [head]
    if record.steps:
        steps = Table(title="steps", title_justify="left")
        columns = ("step", "status", "agent / instance", "model", "attempts", "duration", "usd")
        for column in (*columns, "result"):
            steps.add_column(column, justify="right" if column in ("attempts", "usd") else "left")
        for step in record.steps:
            step_style = STATUS_STYLE.get(step.status, "white")
            who = step.agent or (f"capability {step.capability}" if step.capability else "")
            result = (
                f"[red]{safe(short(step.error))}[/]" if step.error else safe(short(step.output))
            )
            steps.add_row(
                safe(step.name),
                f"[{step_style}]{step.status}[/]",
                safe(f"{who} / {step.instance}" if step.instance else who),
                safe(step.model or "-"),
                str(step.attempts),
                seconds_text(step.duration_ms / 1000) if step.ended_at else "-",
                dollars(step.usage.usd),
                result,
            )
        parts.append(steps)
    calls = [(step.name, call) for step in record.steps for call in step.tool_calls]
    if calls:
        tools = Table(title="tool calls", title_justify="left")
        for column in ("step", "turn", "tool", "arguments", "duration", "by", "result"):
            tools.add_column(column, justify="right" if column == "turn" else "left")
        for step_name, call in calls:
            outcome = (
                f"[red]{safe(short(call.error))}[/]" if call.error else safe(short(call.output))
            )
            tools.add_row(
                safe(step_name),
                str(call.turn),
                safe(call.name),
                safe(short(call.arguments, 60)),
                seconds_text(call.duration_ms / 1000),
                safe(call.instance or "local"),
                outcome,
            )
        parts.append(tools)
    if record.plan is not None:
        plan = Table(title="plan", title_justify="left")
        for column in ("subtask", "capabilities", "depends on", "description"):
            plan.add_column(column)
        for subtask in record.plan.subtasks:
            plan.add_row(
                safe(subtask.id),
                safe(", ".join(subtask.capabilities)),
                safe(", ".join(subtask.depends_on)),
                safe(short(subtask.description)),
            )
        parts.append(plan)
    if record.events:
        chain = Table(title="events", title_justify="left")
        for column in ("time", "topic", "source", "data"):
            chain.add_column(column)
        for event in record.events:
            data = event.data if isinstance(event.data, str) else json.dumps(event.data)
            chain.add_row(
                clock(event.time), safe(event.topic), safe(event.source), safe(short(data))
            )
        parts.append(chain)
    return parts


async def show_run(args: argparse.Namespace, settings: Settings) -> int:
    nc = await connect(settings, "chorus-runs")
    try:
        record = await find_run(
            RunClient(nc, settings.subjects, workflow_dirs=settings.workflow_dirs), args.run_id
        )
    finally:
        await nc.close()
    if args.json:
        print(record_json(record))
        return 0
    console = _console()
    for part in run_view(record):
        console.print(part)
    if record.output:
        console.rule("output", align="left")
        print(for_stream(record.output, sys.stdout))
    if record.error:
        console.print(f"[red]error:[/] {safe(record.error)}")
    return 0


async def cancel_run(args: argparse.Namespace, settings: Settings) -> int:
    nc = await connect(settings, "chorus-runs")
    try:
        runs = RunClient(nc, settings.subjects, workflow_dirs=settings.workflow_dirs)
        record = await find_run(runs, args.run_id)
        if record.finished:
            print(f"run {record.run_id} already {record.status}: nothing to cancel")
            return 1
        await runs.cancel(record.run_id)
        try:
            final = await runs.wait(record.run_id, args.timeout)
        except RequestTimeout:
            print(
                f"cancel of run {record.run_id} asked, but it has not stopped within "
                f"{args.timeout:g}s: is the orchestrator running it alive? (`chorus runs show "
                f"{record.run_id}`)"
            )
            return 1
    finally:
        await nc.close()
    if final.status != "cancelled":
        print(f"run {final.run_id} {final.status} before the cancel took effect")
        return 1
    print(f"run {final.run_id} cancelled: {final.error}")
    return 0


# human steps and steering


def register_control(actions: Any) -> None:
    respond = actions.add_parser(
        "respond",
        help="answer the human step a run waits on",
        description="Answer the human step a waiting run is parked on (`chorus runs` shows it "
        "`waiting`; `chorus runs show ID` shows the prompt). DATA is JSON, @file, or - for "
        "stdin; it is checked against the step's schema, and a refused answer leaves the run "
        "waiting. The run then resumes on any orchestrator. Exit status 0 when the answer was "
        "taken, 2 when it was refused or the run waits for nothing.",
        epilog="examples:\n"
        "  chorus runs respond 3f2a9c '{\"approved\": true}'\n"
        '  echo \'{"approved": false, "reason": "too long"}\' | chorus runs respond 3f2a9c -',
        formatter_class=ExamplesFormatter,
    )
    respond.add_argument("run_id", metavar="ID")
    respond.add_argument("data", metavar="DATA", help="the answer as JSON, @file, or - for stdin")
    respond.set_defaults(func=respond_run)
    steer = actions.add_parser(
        "steer",
        help="tell a running run's agents something at their next model turn",
        description="Add a user message to a run: every agent working on a task of it (and "
        "every task it starts later) sees it before its next model call.",
        epilog="example: chorus runs steer 3f2a9c 'Keep it under 100 words.'",
        formatter_class=ExamplesFormatter,
    )
    steer.add_argument("run_id", metavar="ID")
    steer.add_argument("message", metavar="MESSAGE", help="the text, @file, or - for stdin")
    steer.set_defaults(func=steer_run)


def answer_of(argument: str) -> Any:
    try:
        return json.loads(wire.read_payload(argument))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"DATA is not JSON ({exc}); quote strings: chorus runs respond ID '\"yes\"'"
        ) from None


async def respond_run(args: argparse.Namespace, settings: Settings) -> int:
    value = answer_of(args.data)
    nc = await connect(settings, "chorus-runs")
    try:
        runs = RunClient(nc, settings.subjects, workflow_dirs=settings.workflow_dirs)
        record = await find_run(runs, args.run_id)
        answer = await runs.respond(record.run_id, value, by="cli")
    finally:
        await nc.close()
    print(f"run {record.run_id}: step {answer.step} answered; the run resumes")
    return 0


async def steer_run(args: argparse.Namespace, settings: Settings) -> int:
    text = text_of(args.message)
    nc = await connect(settings, "chorus-runs")
    try:
        runs = RunClient(nc, settings.subjects, workflow_dirs=settings.workflow_dirs)
        record = await find_run(runs, args.run_id)
        await runs.steer(record.run_id, text)
    finally:
        await nc.close()
    print(f"run {record.run_id}: its agents see the message at their next model turn")
    return 0
