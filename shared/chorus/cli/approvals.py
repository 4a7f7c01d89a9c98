"""`chorus approvals`, `chorus approve ID`, `chorus reject ID`: tool calls waiting for a
person (KV <prefix>-approvals, chorus.client.approvals)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import signal
import sys
from typing import TYPE_CHECKING, Any

import msgspec

from chorus.cli.runs import ExamplesFormatter
from chorus.cli.text import safe
from chorus.client.approvals import ApprovalBook
from chorus.config import Settings
from chorus.errors import ConfigError
from chorus.messages import Approval
from chorus.nats.connection import connect

if TYPE_CHECKING:
    from rich.table import Table

STATUS_STYLE = {"pending": "yellow", "approved": "green", "rejected": "red", "expired": "red"}


def register(sub: Any) -> None:
    listing = sub.add_parser(
        "approvals",
        help="tool calls waiting for a person's decision",
        description="List the approvals agents asked for (KV bucket <prefix>-approvals): the "
        "pending ones, or all with --all; --watch follows them live until Ctrl-C.",
        epilog="examples:\n  chorus approvals\n  chorus approvals --watch\n"
        "  chorus approvals --json | jq '.[].approval_id'",
        formatter_class=ExamplesFormatter,
    )
    listing.add_argument("--all", action="store_true", help="decided ones too")
    listing.add_argument("--watch", action="store_true", help="a live table (rich)")
    listing.add_argument("--json", action="store_true", help="print them as JSON, once")
    listing.set_defaults(func=list_approvals)

    approve = sub.add_parser(
        "approve",
        help="approve a tool call that waits (optionally with edited arguments)",
        description="Approve a pending tool call: its task resumes on any instance of the "
        "agent and runs the tool once. --edit replaces the arguments (a JSON object) where the "
        "tool allows it (`approval_edit: true`). Exit 2, naming the decision that stands, when "
        "it was decided already.",
        epilog="examples:\n  chorus approve 3f2a9c0d1e2b4a5f\n"
        "  chorus approve 3f2a9c0d1e2b4a5f --edit '{\"amount\": 90}'",
        formatter_class=ExamplesFormatter,
    )
    approve.add_argument("approval_id", metavar="ID")
    approve.add_argument("--edit", metavar="JSON", help="the arguments to run the tool with")
    approve.add_argument("--reason", default="", help="why (kept on the record)")
    approve.set_defaults(func=decide, approve=True)

    reject = sub.add_parser(
        "reject",
        help="reject a tool call that waits; the model is told why",
        description="Reject a pending tool call: it does not run, and the agent's model reads "
        "that it was rejected and the reason. Exit 2, naming the decision that stands, when it "
        "was decided already.",
        epilog="example: chorus reject 3f2a9c0d1e2b4a5f --reason 'over the monthly budget'",
        formatter_class=ExamplesFormatter,
    )
    reject.add_argument("approval_id", metavar="ID")
    reject.add_argument("--reason", required=True, help="told to the model")
    reject.set_defaults(func=decide, approve=False, edit=None)


def _edit(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--edit must be a JSON object of arguments: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError("--edit must be a JSON object of arguments, e.g. '{\"amount\": 90}'")
    return value


def _decider() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


async def decide(args: argparse.Namespace, settings: Settings) -> int:
    edit = _edit(args.edit)
    nc = await connect(settings, "chorus-approve")
    try:
        book = ApprovalBook(nc, settings.subjects)
        decided = await book.decide(
            args.approval_id, approve=args.approve, reason=args.reason, edit=edit, by=_decider()
        )
    finally:
        await nc.close()
    print(f"{decided.approval_id} {decided.status}: {decided.tool} of {decided.agent} resumes")
    return 0


def table(approvals: dict[str, Approval]) -> Table:
    from rich.table import Table

    view = Table(title=f"{len(approvals)} approvals", title_justify="left")
    for column in ("id", "status", "agent", "tool", "arguments", "run", "expires", "why"):
        view.add_column(column)
    for item in sorted(approvals.values(), key=lambda a: a.created_at):
        style = STATUS_STYLE.get(item.status, "white")
        view.add_row(
            safe(item.approval_id),
            f"[{style}]{safe(item.status)}[/]",
            safe(item.agent),
            safe(item.tool),
            safe(json.dumps(item.runs_with, ensure_ascii=False)[:80]),
            safe(item.run_id or "-"),
            safe(item.expires_at),
            safe(item.reason or item.why),
        )
    return view


async def list_approvals(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console
    from rich.live import Live

    nc = await connect(settings, "chorus-approvals")
    try:
        book = ApprovalBook(nc, settings.subjects)
        found = await book.listed(pending_only=not args.all)
        if args.json:
            print(json.dumps([msgspec.to_builtins(a) for a in found], indent=2))
            return 0
        console = Console() if sys.stdout.isatty() else Console(width=200)
        shown = {a.approval_id: a for a in found}
        if not args.watch:
            console.print(table(shown))
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        changed = asyncio.Event()

        async def follow() -> None:
            async for approval in book.watch():
                if approval.status == "pending" or args.all:
                    shown[approval.approval_id] = approval
                else:
                    shown.pop(approval.approval_id, None)
                changed.set()

        following = asyncio.create_task(follow())
        with Live(table(shown), console=console, refresh_per_second=4) as live:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 0.5)
                changed.clear()
                live.update(table(shown))
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
    finally:
        await nc.close()
    return 0
