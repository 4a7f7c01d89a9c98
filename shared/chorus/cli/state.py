"""`chorus state`: read, write, delete, watch and look back at shared state (KV <prefix>-state)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any, Final

import msgspec

from chorus.cli import wire
from chorus.cli.runs import ExamplesFormatter
from chorus.cli.times import iso
from chorus.config import Settings
from chorus.nats.connection import connect
from chorus.state import SharedState, StateValue
from chorus.state.bucket import check_key, check_pattern

OPERATION_STYLE: Final = {"put": "green", "delete": "red", "purge": "red", "expired": "yellow"}


def register(sub: Any) -> None:
    state = sub.add_parser(
        "state",
        help="read, write and watch shared state",
        description="Shared state: JSON values in the KV bucket <prefix>-state, the same agents "
        "read and write with chorus.state.SharedState. Keys are dot-separated parts of "
        "letters, digits and '-/_='. Writes from the CLI are signed cli-<host>-<pid>.",
        epilog="examples:\n"
        "  chorus state put orders.7 '{\"qty\": 2}'\n"
        "  chorus state get orders.7\n"
        "  chorus state watch 'orders.>'\n"
        "  chorus state history orders.7",
        formatter_class=ExamplesFormatter,
    )
    actions = state.add_subparsers(dest="state_command", required=True, metavar="ACTION")

    get = actions.add_parser(
        "get",
        help="print a key's value",
        description="Print the key's value: a string as it is, anything else as JSON. Exit "
        "status 1 when the key has no value (never set, or deleted); 2 for an invalid key.",
        epilog="examples:\n  chorus state get orders.7\n  chorus state get orders.7 --json",
        formatter_class=ExamplesFormatter,
    )
    get.add_argument("key", metavar="KEY")
    get.add_argument(
        "--json", action="store_true", help="print value, revision, writer and time as JSON"
    )
    get.set_defaults(func=get_value)

    put = actions.add_parser(
        "put",
        help="store a value",
        description="Store VALUE under KEY (last writer wins). VALUE is read as JSON, and as a "
        "plain string when it is not valid JSON: quote it as JSON (`'\"42\"'`) to store a "
        "number-like string. @file reads a file, - reads standard input.",
        epilog="examples:\n  chorus state put orders.7 '{\"qty\": 2}'\n"
        "  chorus state put greeting 'hello there'\n  chorus state put config @config.json\n"
        "  echo 42 | chorus state put counter -",
        formatter_class=ExamplesFormatter,
    )
    put.add_argument("key", metavar="KEY")
    put.add_argument("value", metavar="VALUE", help="JSON or text, @file, or - for stdin")
    put.set_defaults(func=put_value)

    delete = actions.add_parser(
        "delete",
        help="delete a key's value (its history is kept)",
        description="Delete the key's value. Watchers see a delete; `history` still lists the "
        "earlier values.",
        epilog="example: chorus state delete orders.7",
        formatter_class=ExamplesFormatter,
    )
    delete.add_argument("key", metavar="KEY")
    delete.set_defaults(func=delete_value)

    watch = actions.add_parser(
        "watch",
        help="print changes as they happen",
        description="Print every change to keys matching PATTERN (default '>', every key) as "
        "it happens, until Ctrl-C or --count changes. A part of the pattern may be '*', the "
        "last may be '>'. Says `watching ...` on stderr once it is listening.",
        epilog="examples:\n  chorus state watch\n  chorus state watch 'orders.>' --json\n"
        "  chorus state watch orders.7 --current --count 1",
        formatter_class=ExamplesFormatter,
    )
    watch.add_argument("pattern", metavar="PATTERN", nargs="?", default=">")
    watch.add_argument("--count", type=int, default=0, help="stop after N changes")
    watch.add_argument("--json", action="store_true", help="one JSON object per line")
    watch.add_argument(
        "--current", action="store_true", help="first print the current value of each key"
    )
    watch.set_defaults(func=watch_changes)

    listing = actions.add_parser(
        "ls",
        help="list the keys that have a value, optionally under a prefix",
        description="List the keys that have a value now (deleted or expired ones are not "
        "listed), sorted, one per line. With PREFIX, only PREFIX itself and the keys under "
        "it (`orders` lists orders and orders.7, not orders2). Lock leases (_lock.*) are "
        "listed only with the prefix _lock.",
        epilog="examples:\n  chorus state ls\n  chorus state ls orders\n"
        "  chorus state ls orders --json | jq length",
        formatter_class=ExamplesFormatter,
    )
    # Not `prefix`: that is the subject prefix (--prefix), which every command takes.
    listing.add_argument("key_prefix", metavar="PREFIX", nargs="?")
    listing.add_argument("--json", action="store_true", help="print the keys as a JSON list")
    listing.set_defaults(func=list_keys)

    history = actions.add_parser(
        "history",
        help="a key's earlier values, oldest first",
        description="List the stored revisions of KEY, oldest first, deletes included (the "
        "bucket keeps the last 16). Exit status 1 when the key has none.",
        epilog="example: chorus state history orders.7",
        formatter_class=ExamplesFormatter,
    )
    history.add_argument("key", metavar="KEY")
    history.add_argument("--json", action="store_true", help="print the revisions as JSON")
    history.set_defaults(func=show_history)


def writer_id() -> str:
    """Who the CLI writes as: stored with each value, so watchers and history can tell."""
    return f"cli-{socket.gethostname()}-{os.getpid()}"


def value_of(argument: str) -> Any:
    """JSON when VALUE is JSON, else the text itself (a file's last newline left off)."""
    text = wire.read_payload(argument).decode(errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text.removesuffix("\n")


def as_text(value: Any, *, indent: int | None = None) -> str:
    return value if isinstance(value, str) else json.dumps(value, indent=indent, ensure_ascii=False)


def as_json(value: StateValue | list[StateValue]) -> str:
    return json.dumps(msgspec.to_builtins(value), ensure_ascii=False)


@contextlib.asynccontextmanager
async def shared_state(settings: Settings) -> AsyncIterator[SharedState]:
    nc = await connect(settings, "chorus-state")
    try:
        async with SharedState(nc, settings.subjects, writer_id()) as state:
            yield state
    finally:
        await nc.close()


def _missing(key: str) -> int:
    print(f"chorus: key {key!r} has no value", file=sys.stderr)
    return 1


async def get_value(args: argparse.Namespace, settings: Settings) -> int:
    key = check_key(args.key)
    async with shared_state(settings) as state:
        found = await state.get(key)
    if found is None:
        return _missing(key)
    print(as_json(found) if args.json else as_text(found.value, indent=2))
    return 0


async def put_value(args: argparse.Namespace, settings: Settings) -> int:
    key = check_key(args.key)
    value = value_of(args.value)
    async with shared_state(settings) as state:
        revision = await state.put(key, value)
    print(f"stored {key} at revision {revision}")
    return 0


async def delete_value(args: argparse.Namespace, settings: Settings) -> int:
    key = check_key(args.key)
    async with shared_state(settings) as state:
        had = await state.get(key)
        await state.delete(key)
    print(f"deleted {key}" + ("" if had is not None else " (it had no value)"))
    return 0


async def list_keys(args: argparse.Namespace, settings: Settings) -> int:
    async with shared_state(settings) as state:
        keys = await state.keys(args.key_prefix)
    if args.json:
        print(json.dumps(keys))
    elif keys:
        print("\n".join(keys))
    else:
        under = f" under {args.key_prefix!r}" if args.key_prefix else ""
        print(f"chorus: no keys{under} in {settings.subjects.state_bucket}", file=sys.stderr)
    return 0


def change_line(change: StateValue) -> str:
    from rich.markup import escape

    style = OPERATION_STYLE.get(change.operation, "white")
    value = "" if change.removed else " " + wire.short(as_text(change.value), 160)
    by = f" by {change.writer}" if change.writer else ""
    return (
        f"[dim]{iso(change.time)}[/] "
        f"[{style}]{change.operation}[/] [bold]{escape(change.key)}[/]{escape(value)} "
        f"[dim](rev {change.revision}{escape(by)})[/]"
    )


async def watch_changes(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console

    pattern = check_pattern(args.pattern)
    console = Console(highlight=False, soft_wrap=True)
    done = asyncio.Event()
    seen = 0

    async def on_change(change: StateValue) -> None:
        nonlocal seen
        if done.is_set():
            return
        if args.json:
            print(as_json(change), flush=True)
        else:
            console.print(change_line(change))
        seen += 1
        if args.count and seen >= args.count:
            done.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    # The watch is closed before the SharedState, not by it: SharedState.close() iterates a
    # set that closing watches remove themselves from.
    async with (
        shared_state(settings) as state,
        await state.watch(pattern, on_change, include_current=args.current),
    ):
        print(
            f"watching {pattern} in {settings.subjects.state_bucket} (Ctrl-C to stop)",
            file=sys.stderr,
            flush=True,
        )
        await done.wait()
    return 0


async def show_history(args: argparse.Namespace, settings: Settings) -> int:
    key = check_key(args.key)
    async with shared_state(settings) as state:
        revisions = await state.history(key)
    if not revisions:
        print(f"chorus: key {key!r} has no history", file=sys.stderr)
        return 1
    if args.json:
        print(as_json(revisions))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"history of {escape(key)}", title_justify="left")
    for column in ("revision", "time", "operation", "writer", "value"):
        table.add_column(column, justify="right" if column == "revision" else "left")
    for change in revisions:
        style = OPERATION_STYLE.get(change.operation, "white")
        table.add_row(
            str(change.revision),
            iso(change.time),
            f"[{style}]{change.operation}[/]",
            escape(change.writer),
            "" if change.removed else escape(wire.short(as_text(change.value), 100)),
        )
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)
    return 0
