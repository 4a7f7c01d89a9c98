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
from chorus.client.system import DEFAULT_INTERVAL_S, SystemClient, judged
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
    for stored in sorted(records.values(), key=lambda r: (r.name, r.instance)):
        record = judged(stored, now)  # "healthy" goes stale while the table is up
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


HEAR_AT_MOST_S = 5.0  # how long `--once`/`--json` wait for instances' heartbeats


async def _hear_heartbeats(
    records: dict[str, AgentRecord], beaten: set[str], beat_again: asyncio.Event
) -> None:
    """Wait until every listed instance the coordinator has not found dead has sent a
    heartbeat, or for 1.5 of the longest of their intervals (at most HEAR_AT_MOST_S): then
    "last seen" is from heartbeats, not from when the registry was last written, and an
    entry whose coordinator is gone but whose instance still beats is not shown dead."""
    waiting = {i for i, r in records.items() if r.health != "dead"}
    if not waiting:
        return
    longest = max(records[i].interval_s or DEFAULT_INTERVAL_S for i in waiting)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(1.5 * longest, HEAR_AT_MOST_S)
    while not waiting <= beaten and (left := deadline - loop.time()) > 0:
        beat_again.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(beat_again.wait(), left)


async def show_agents(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console
    from rich.live import Live

    nc = await connect(settings, "chorus-agents")
    try:
        system = SystemClient(nc, settings.subjects)
        records: dict[str, AgentRecord] = {}
        beaten: set[str] = set()
        beat_again = asyncio.Event()

        async def on_heartbeat(msg: Msg) -> None:
            # The registry lags heartbeats (it is rewritten every few intervals): "last
            # seen" and the load come from the heartbeats themselves whenever one arrives.
            with contextlib.suppress(InvalidMessage):
                beat = decode(msg.data, Heartbeat)
                known = records.get(beat.instance)
                if known is not None and beat.state != "stopped":
                    records[beat.instance] = msgspec.structs.replace(
                        known,
                        last_seen=max(known.last_seen, beat.sent_at),
                        in_flight=beat.in_flight + beat.waiting,
                    )
                    beaten.add(beat.instance)
                    beat_again.set()

        await nc.subscribe(settings.subjects.all_heartbeats, cb=on_heartbeat)
        try:
            # As stored: judged when shown, once heartbeats have had their say.
            listed = await system.agents(create=False, judge=False)
        except NotFound as exc:
            print(exc.reason)
            return 1
        records.update({r.instance: r for r in listed})
        if args.json or args.once:
            await _hear_heartbeats(records, beaten, beat_again)
        if args.json:
            now = time.time()
            shown = [msgspec.to_builtins(judged(r, now)) for r in records.values()]
            print(json.dumps(shown, indent=2))
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

        async def follow() -> None:
            async for change in system.watch_agents(judge=False):
                if change.record is None:
                    records.pop(change.instance, None)
                else:
                    records[change.instance] = change.record

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
