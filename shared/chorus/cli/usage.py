"""`chorus usage`: tokens and dollars by run, model, day (from run heads) or agent (from the
registry), and the spend lines of `chorus runs show`."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from chorus.client.runs import RunClient
from chorus.client.system import SystemClient
from chorus.config import Settings
from chorus.errors import ConfigError
from chorus.messages import RunFields, RunHead, Usage
from chorus.nats.connection import connect

if TYPE_CHECKING:
    from rich.table import Table

ALL_RUNS: Final = 1_000_000
_AGO = re.compile(r"^(\d+(?:\.\d+)?)([mhd])$")
_UNITS: Final = {"m": 60, "h": 3600, "d": 86400}


def register(sub: Any) -> None:
    usage = sub.add_parser(
        "usage",
        help="tokens and dollars spent, by model, run, day or agent",
        description="Add up what model calls used and cost (prices: the shipped table and "
        "CHORUS_PRICES, applied by each agent as it calls). By run, model and day: from the "
        "runs' records (KV <prefix>-runs). By agent: the running instances' counters since "
        "each started (the registry; needs a coordinator).",
        epilog="examples:\n  chorus usage\n  chorus usage --by run --since 24h\n"
        "  chorus usage --by day --since 2026-12-01\n  chorus usage --by agent --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    usage.add_argument(
        "--by", choices=["model", "run", "day", "agent"], default="model", help="(default model)"
    )
    usage.add_argument(
        "--since",
        metavar="WHEN",
        help="runs created since: 90m, 24h, 7d, or a date 2026-12-01 (UTC)",
    )
    usage.add_argument("--json", action="store_true", help="print the rows as JSON")
    usage.set_defaults(func=show_usage)


def since_of(text: str | None, now: float | None = None) -> float:
    """A Unix time from `90m` / `24h` / `7d` ago or an ISO date (UTC); 0 for None."""
    if not text:
        return 0.0
    ago = _AGO.match(text.strip())
    if ago:
        return (now or time.time()) - float(ago.group(1)) * _UNITS[ago.group(2)]
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"--since {text!r}: give 90m, 24h, 7d or a date like 2026-12-01"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def dollars(usd: float) -> str:
    return f"${usd:.4f}" if usd < 10 else f"${usd:,.2f}"


def spend_text(usage: Usage) -> str:
    """`12,345 tokens (10,000 in, 345 cached, 2,345 out), $0.0123`"""
    cached = f", {usage.cached_tokens:,} cached" if usage.cached_tokens else ""
    return (
        f"{usage.total_tokens:,} tokens ({usage.input_tokens:,} in{cached}, "
        f"{usage.output_tokens:,} out), {dollars(usage.usd)}"
    )


def budget_text(record: RunFields) -> str | None:
    """The run's budget and what its account was charged, for `chorus runs show`."""
    budget = record.budget
    if budget is None:
        return None
    limits = [f"{budget.tokens:,} tokens"] if budget.tokens else []
    limits += [dollars(budget.usd)] if budget.usd else []
    text = f"{' and '.join(limits)}, policy {budget.policy}"
    if record.charged is not None:
        text += f"; charged {spend_text(record.charged)}"
    return text


def rows(by: str, heads: Iterable[RunHead]) -> list[dict[str, Any]]:
    """The usage of these runs grouped by `run`, `model` or `day`, largest spend first."""
    groups: dict[str, dict[str, Any]] = {}
    for head in heads:
        if by == "run":
            spent = head.charged or head.usage
            groups[head.run_id] = {
                "run": head.run_id,
                "workflow": head.workflow_name,
                "status": head.status,
                "usage": spent,
            }
            continue
        if by == "model":
            parts = head.by_model.items() or [("(not recorded)", head.usage)]
        else:
            day = datetime.datetime.fromtimestamp(head.created_at, datetime.UTC).date().isoformat()
            parts = [(day, head.charged or head.usage)]
        for key, usage in parts:
            row = groups.setdefault(key, {by: key, "runs": 0, "usage": Usage()})
            row["runs"] += 1
            row["usage"] = row["usage"] + usage
    ordered = sorted(groups.values(), key=lambda r: (r["usage"].usd, r["usage"].total_tokens))
    if by == "day":
        ordered = sorted(groups.values(), key=lambda r: str(r["day"]))
    return ordered[::-1] if by != "day" else ordered


def agent_rows(records: Iterable[Any]) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for record in records:
        row = groups.setdefault(
            record.name, {"agent": record.name, "instances": 0, "usage": Usage()}
        )
        row["instances"] += 1
        row["usage"] = row["usage"] + record.usage
    return sorted(groups.values(), key=lambda r: (r["usage"].usd, r["usage"].total_tokens))[::-1]


def usage_table(by: str, found: list[dict[str, Any]]) -> Table:
    from rich.markup import escape
    from rich.table import Table

    count = "instances" if by == "agent" else "runs"
    extra = ["workflow", "status"] if by == "run" else [count]
    view = Table(title=f"usage by {by}", title_justify="left")
    for column in (by, *extra, "tokens", "in", "cached", "out", "usd"):
        numeric = column in ("tokens", "in", "cached", "out", "usd", count)
        view.add_column(column, justify="right" if numeric else "left")
    total = Usage()
    for row in found:
        usage: Usage = row["usage"]
        total = total + usage
        cells = [escape(str(row[c])) for c in (by, *extra)]
        view.add_row(*cells, *_numbers(usage))
    view.add_section()
    view.add_row("total", *([""] * len(extra)), *_numbers(total))
    return view


def _numbers(usage: Usage) -> list[str]:
    return [
        f"{usage.total_tokens:,}",
        f"{usage.input_tokens:,}",
        f"{usage.cached_tokens:,}",
        f"{usage.output_tokens:,}",
        dollars(usage.usd),
    ]


async def show_usage(args: argparse.Namespace, settings: Settings) -> int:
    since = since_of(args.since)
    nc = await connect(settings, "chorus-usage")
    try:
        if args.by == "agent":
            found = agent_rows(await SystemClient(nc, settings.subjects).agents(create=False))
        else:
            runs = RunClient(nc, settings.subjects, workflow_dirs=settings.workflow_dirs)
            heads = [h for h in await runs.list(ALL_RUNS) if h.created_at >= since]
            found = rows(args.by, heads)
    finally:
        await nc.close()
    if args.json:
        import msgspec

        print(json.dumps(msgspec.to_builtins(found), indent=2))
        return 0
    if not found:
        print("no usage recorded" + (f" since {args.since}" if args.since else ""))
        return 0
    from rich.console import Console

    console = (
        Console(highlight=False) if sys.stdout.isatty() else Console(highlight=False, width=200)
    )
    console.print(usage_table(args.by, found))
    return 0
