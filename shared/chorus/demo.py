"""`chorus demo`: the main job on the embedded default, end to end, with no API key."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from chorus.client import ChorusClient
from chorus.config import Settings
from chorus.connection import connect
from chorus.examples import AGENTS
from chorus.local import LocalSystem, wait_for_instances
from chorus.messages import Task

console = Console(stderr=False)


async def quickstart(data_dir: str | None, question: str, settings: Settings) -> int:
    """Start nats-server and three agent processes, route one task, print the answer, stop."""
    root = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="chorus-demo-"))
    system = LocalSystem(root, prefix=settings.prefix)
    with console.status("starting nats-server"):
        await asyncio.to_thread(system.start_server)
    console.print(f"[green]nats-server[/] ready at {system.url} (data in {root})")
    try:
        system.spawn("researcher-1", "agent", "run", str(AGENTS / "researcher.yaml"))
        system.spawn("researcher-2", "agent", "run", str(AGENTS / "researcher.yaml"))
        system.spawn("analyst-1", "agent", "run", str(AGENTS / "analyst.yaml"))
        local = Settings.from_env(nats_url=system.url, prefix=settings.prefix)
        nc = await connect(local, "chorus-demo")
        try:
            with console.status("waiting for 3 agent processes to report ready"):
                seen = await wait_for_instances(
                    nc, local.subjects, {"researcher": 2, "analyst": 1}, timeout=30
                )
            for name, instances in seen.items():
                console.print(f"[green]{name}[/]: {', '.join(sorted(instances))}")
            client = ChorusClient(nc, local.subjects, timeout=30)
            result = await client.run_task(Task(input=question), capability="research")
            console.print(f"\n[bold]task[/] → capability [cyan]research[/]: {escape(question)}")
            console.print(
                f"[bold]answered by[/] {result.agent} ({result.instance}) "
                f"in {result.duration_ms:.1f} ms, {result.usage.total_tokens} tokens"
            )
            console.print(f"[bold]output[/]: {escape(result.output)}")
        finally:
            await nc.close()
    finally:
        with console.status("stopping (agents drain first)"):
            await asyncio.to_thread(system.stop)
    return 0
