"""`chorus demo`: the main job on the embedded default, end to end, with no API key.

It starts a local system (nats-server, coordinator, orchestrator and the example agents,
each its own process) unless `--attach` points it at a running one, routes one task to
the `research` capability (its text shown as the agent writes it: set
CHORUS_OFFLINE_CHUNK_DELAY=0.05 to watch the offline model type), shows agents calling
tools, parks a task on a tool call that needs a person's approval (decided in another
terminal with `chorus approve ID`, or by the demo itself with `--approve`), then runs the
example workflow of each pattern and prints what came back.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from chorus.client import ChorusClient
from chorus.client.runs import RunClient
from chorus.client.streams import ChunkReader
from chorus.config import Settings
from chorus.demo.approval import show_approval
from chorus.local import LocalSystem, wait_for_instances
from chorus.messages import RunRecord, RunRequest, Task
from chorus.messages.runs import step_counts
from chorus.nats.connection import connect
from chorus.up import default_agents, start_services

# Wide enough for the results table when piped (rich assumes 80 columns then).
console = Console() if sys.stdout.isatty() else Console(width=140)

# pattern -> example workflow (shared/chorus/examples/workflows/<name>.yaml), its data
PATTERNS: tuple[tuple[str, str, object], ...] = (
    ("pipeline", "research-report", None),
    ("parallel", "perspectives", None),
    ("event-driven", "findings", None),
    ("hierarchical", "delegated-brief", None),
    ("business process", "vendor-review", {"vendor": "Acme Ltd", "amount": 25000}),
)


async def run_demo(
    settings: Settings,
    data_dir: str | None,
    question: str,
    *,
    attach: bool,
    timeout: float,
    approve: bool | None = None,
) -> int:
    """`approve`: decide the demo's approval itself (True), leave it to a person (False), or
    (None) decide it itself only when stdin is not a terminal, so the demo runs unattended."""
    if approve is None:
        approve = not sys.stdin.isatty()
        if approve:
            console.print("stdin is not a terminal: the demo approves its tool call itself")
    system: LocalSystem | None = None
    env_setup = ""  # what another terminal runs first to reach this system (attach: theirs)
    if not attach:
        root = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="chorus-demo-"))
        # Authorization on, as with `chorus up`: the demo connects as the operator.
        specs = [agent.load() for agent in default_agents()]
        system = LocalSystem(root, prefix=settings.prefix, agents=specs)
        with console.status("starting nats-server"):
            await asyncio.to_thread(system.start_server)
        console.print(f"[green]nats-server[/] ready at {system.url} (data and logs in {root})")
        start_services(system, default_agents(), gateway_port=None)
        settings = system.settings_for("operator", Settings.from_env(prefix=settings.prefix))
        env_setup = f"export NATS_URL={system.url}"
        if system.auth is not None:
            env_setup = f"set -a; . {system.auth.env_file('operator')}; set +a; {env_setup}"
    try:
        nc = await connect(settings, "chorus-demo")
        try:
            return await _show(
                nc,
                settings,
                question,
                timeout,
                expect_all=system is not None,
                approve=approve,
                env_setup=env_setup,
            )
        finally:
            await nc.close()
    finally:
        if system is not None:
            with console.status("stopping: agents drain, then services, then nats-server"):
                await asyncio.to_thread(system.stop)


def milliseconds(value: float) -> str:
    """A duration people can read at any size: `1520 ms`, `3.4 ms`, `42 µs`, never `0.0 ms`."""
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 0.1:
        return f"{value:.1f} ms"
    return f"{max(value * 1000, 1):.0f} µs" if value > 0 else "under 1 µs"


async def _show_tools(client: ChorusClient, question: str, capability: str, what: str) -> None:
    """A task for an agent whose model calls a tool before it answers; its tool calls."""
    sent = time.perf_counter()
    result = await client.run_task(Task(input=question), capability=capability)
    round_trip_ms = (time.perf_counter() - sent) * 1000
    console.print(
        f"[bold]task[/] → capability [cyan]{capability}[/] ({what}): "
        f"{milliseconds(round_trip_ms)} round trip"
    )
    for call in result.tool_calls:
        outcome = f"[red]{escape(call.error)}[/]" if call.error else escape(call.output[:120])
        where = f" on {call.instance}" if call.instance else ""
        console.print(
            f"  [magenta]tool call[/] turn {call.turn}: {escape(call.name)}"
            f"({escape(call.arguments[:80])}){where} in {milliseconds(call.duration_ms)} "
            f"→ {outcome}"
        )
    console.print(f"[bold]output[/]: {escape(result.output)}\n")


async def _live_output(chunks: ChunkReader) -> None:
    """A task's text as its agent writes it, up to its final chunk."""
    console.print("[bold]live output[/]: ", end="")
    async for chunk in chunks:
        if chunk.kind == "delta":
            console.out(chunk.text, end="", highlight=False)
        elif chunk.kind == "final":
            console.out("")
            return


async def _show(
    nc: object,
    settings: Settings,
    question: str,
    timeout: float,
    *,
    expect_all: bool,
    approve: bool,
    env_setup: str,
) -> int:
    from nats.aio.client import Client

    assert isinstance(nc, Client)
    wanted = {a.name: (a.replicas if expect_all else 1) for a in default_agents()}
    with console.status(f"waiting for {sum(wanted.values())} agent processes to report ready"):
        seen = await wait_for_instances(nc, settings.subjects, wanted, timeout=60)
    for name, instances in seen.items():
        console.print(f"[green]{name}[/]: {', '.join(sorted(instances))}")

    client = ChorusClient(nc, settings.subjects, timeout=30)
    console.print(f"\n[bold]task[/] → capability [cyan]research[/]: {escape(question)}")
    task = Task(input=question)
    async with client.stream("", task.task_id, max_age_s=settings.stream_max_age) as chunks:
        showing = asyncio.create_task(_live_output(chunks))
        sent = time.perf_counter()
        result = await client.run_task(task, capability="research")
        round_trip_ms = (time.perf_counter() - sent) * 1000
        try:
            await asyncio.wait_for(showing, 10)  # the final chunk is stored before the answer
        except TimeoutError:  # a slow machine: the answer below is what counts
            console.print("(the live output's last chunk did not arrive within 10 s)")
    console.print(
        f"[bold]answered by[/] {result.agent} ({result.instance}): "
        f"{milliseconds(round_trip_ms)} round trip, {milliseconds(result.duration_ms)} in the "
        f"agent, {result.usage.total_tokens} tokens"
    )
    console.print(f"[bold]output[/]: {escape(result.output)}\n")

    if "glossary" in wanted:
        await _show_tools(client, question, "glossary", "an agent with a Python tool")
    if "editor" in wanted:
        await _show_tools(client, question, "editing", "an agent with another agent as a tool")
    approval_shown = True
    if "announcer" in wanted:
        approval_shown = await show_approval(
            console, nc, settings, question, approve=approve, env_setup=env_setup, timeout=timeout
        )

    runs = RunClient(nc, settings.subjects, workflow_dirs=settings.workflow_dirs)
    table = Table(title="one workflow of each pattern", title_justify="left")
    for column in ("pattern", "workflow", "status", "steps", "tokens", "output"):
        table.add_column(column, overflow="fold")
    records: list[RunRecord] = []
    for pattern, name, data in PATTERNS:
        with console.status(f"running {pattern}: {name}"):
            request = RunRequest(workflow_name=name, input=question, data=data)
            pending = await runs.submit(request)
            record = await runs.wait(pending.run_id, timeout=timeout)
        records.append(record)
        done, total = step_counts(record)  # as `chorus runs` counts them
        colour = "green" if record.status == "completed" else "red"
        text = record.output or record.error
        table.add_row(
            pattern,
            name,
            f"[{colour}]{record.status}[/]",
            f"{done}/{total}",
            str(record.usage.total_tokens),
            escape(text if len(text) < 90 else text[:87] + "..."),
        )
    console.print(table)
    console.print(
        "see any run in full: chorus runs show <run id>  (run ids: "
        + ", ".join(r.run_id[:8] for r in records)
        + ")"
    )
    return 0 if approval_shown and all(r.status == "completed" for r in records) else 1
