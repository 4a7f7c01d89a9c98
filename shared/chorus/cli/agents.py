"""`chorus agents`: the registry as a live table (or JSON for scripts)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import msgspec
from nats.aio.msg import Msg

from chorus.cli.text import safe
from chorus.client.system import SystemClient
from chorus.config import Settings
from chorus.errors import InvalidMessage, NotFound
from chorus.messages import AgentRecord, Heartbeat, decode
from chorus.nats.connection import connect

if TYPE_CHECKING:
    from rich.table import Table

HEALTH_STYLE = {"healthy": "green", "unhealthy": "yellow", "dead": "red"}


def register(sub: Any) -> None:
    agents = sub.add_parser(
        "agents",
        help="list agent instances: health, load, success rate, latency",
        description="Show the registry the coordinator keeps (KV bucket <prefix>-agents), "
        "updating live until Ctrl-C. Needs a running coordinator.",
        epilog="examples:\n  chorus agents\n  chorus agents --once\n  chorus agents --json | jq",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    agents.add_argument("--json", action="store_true", help="print the entries as JSON, once")
    agents.add_argument("--once", action="store_true", help="print the table once")
    agents.set_defaults(func=show_agents)


def table(records: dict[str, AgentRecord]) -> Table:
    from rich.table import Table

    view = Table(title=f"{len(records)} agent instances", title_justify="left")
    for column in (
        "instance",
        "agent",
        "capabilities",
        "health",
        "load",
        "success",
        "mean ms",
        "breaker",
        "last seen",
    ):
        view.add_column(
            column, justify="right" if column in ("load", "success", "mean ms") else "left"
        )
    now = time.time()
    for record in sorted(records.values(), key=lambda r: (r.name, r.instance)):
        style = HEALTH_STYLE.get(record.health, "white")
        view.add_row(
            safe(record.instance),
            safe(record.name),
            safe(",".join(record.capabilities)),
            f"[{style}]{safe(record.health)}[/]",
            f"{record.in_flight}/{record.max_concurrency}",
            f"{record.success_rate:.0%}",
            f"{record.mean_latency_ms:.1f}",
            safe(record.breaker),
            f"{now - record.last_seen:.1f}s ago",
        )
    return view


async def show_agents(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console
    from rich.live import Live

    nc = await connect(settings, "chorus-agents")
    try:
        system = SystemClient(nc, settings.subjects)
        try:
            listed = await system.agents(create=False)
        except NotFound as exc:
            print(exc.reason)
            return 1
        records = {r.instance: r for r in listed}
        if args.json:
            print(json.dumps([msgspec.to_builtins(r) for r in records.values()], indent=2))
            return 0
        # Piped output is not cut to 80 columns: scripts and logs get whole rows.
        console = Console() if sys.stdout.isatty() else Console(width=200)
        if args.once:
            console.print(table(records))
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        async def on_heartbeat(msg: Msg) -> None:
            # The registry is rewritten on change (or every 20 s); heartbeats keep "last
            # seen" and the load live between writes.
            with contextlib.suppress(InvalidMessage):
                beat = decode(msg.data, Heartbeat)
                known = records.get(beat.instance)
                if known is not None:
                    records[beat.instance] = msgspec.structs.replace(
                        known, last_seen=beat.sent_at, in_flight=beat.in_flight + beat.waiting
                    )

        async def follow() -> None:
            async for change in system.watch_agents():
                if change.record is None:
                    records.pop(change.instance, None)
                else:
                    records[change.instance] = change.record

        await nc.subscribe(settings.subjects.all_heartbeats, cb=on_heartbeat)
        following = asyncio.create_task(follow())
        with Live(table(records), console=console, refresh_per_second=4) as live:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)
                live.update(table(records))  # "last seen" keeps counting
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
    finally:
        await nc.close()
    return 0
