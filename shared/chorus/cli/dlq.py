"""`chorus dlq ls|show|replay|purge`: the dead letters (stream <PREFIX>_DLQ).

The library is `chorus.client.dead_letters`; this module parses and prints. It needs the
operator's credentials under generated authorization (replay and purge change the DLQ).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from chorus.cli.runs import ExamplesFormatter
from chorus.cli.text import one_line
from chorus.config import Settings
from chorus.errors import ConfigError

if TYPE_CHECKING:
    from chorus.client.dead_letters import DeadLetters, Letter


def _open(settings: Settings) -> Any:
    """Connect as the caller (operator credentials under generated auth), lazily imported:
    registering the command costs `chorus agent run` nothing."""
    from chorus.nats.connection import connect

    return connect(settings, "chorus-dlq")


def _letters(nc: Any, settings: Settings) -> DeadLetters:
    from chorus.client.dead_letters import DeadLetters

    return DeadLetters(nc, settings.subjects)


def register(sub: Any) -> None:
    dlq = sub.add_parser(
        "dlq",
        help="list, show, replay and purge dead letters",
        description="Dead letters: durable tasks the coordinator gave up on and queue messages "
        "taken off without being handled, each with its reason, on <prefix>.dlq.<queue> "
        "(queue `runs`, or a dispatch target such as `cap.research`).",
        epilog="examples:\n  chorus dlq ls\n  chorus dlq ls cap.research\n  chorus dlq show 7\n"
        "  chorus dlq replay 7\n  chorus dlq replay --all --queue cap.research\n"
        "  chorus dlq purge --queue runs --yes",
        formatter_class=ExamplesFormatter,
    )
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    ls = actions.add_parser(
        "ls",
        help="one line per dead letter: SEQ TIME QUEUE DELIVERIES CODE: REASON",
        description="List dead letters, oldest first (TIME is when it was given up on, "
        "ISO 8601 UTC; DELIVERIES how often it was delivered or attempted).",
    )
    ls.add_argument("queue", nargs="?", metavar="QUEUE", help="only this queue")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=list_letters)
    show = actions.add_parser("show", help="one dead letter in full, as JSON")
    show.add_argument("seq", type=int, metavar="SEQ")
    show.set_defaults(func=show_letter)
    replay = actions.add_parser(
        "replay",
        help="republish the original message to its subject, then delete the letter",
        description="Republish each letter's original message to its original subject and, "
        "once JetStream has acked it, delete the letter: at least once (a crash in between "
        "leaves the letter to replay again). A task's failed outcome is deleted so it runs "
        "again. Fix what made it fail first.",
    )
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("seq", type=int, nargs="?", metavar="SEQ")
    which.add_argument("--all", action="store_true", help="every letter (of --queue)")
    replay.add_argument("--queue", metavar="QUEUE", help="with --all: only this queue")
    replay.set_defaults(func=replay_letters)
    purge = actions.add_parser("purge", help="delete dead letters without replaying them")
    purge.add_argument("--queue", metavar="QUEUE", help="only this queue")
    purge.add_argument("--yes", action="store_true", help="yes, delete them (required)")
    purge.set_defaults(func=purge_letters)


def letter_line(letter: Letter) -> str:
    what = f"{letter.code}: {letter.reason}" if letter.code else letter.reason
    return "  ".join(
        (
            str(letter.seq),
            letter.time or "-",
            one_line(letter.queue),
            str(letter.deliveries),
            one_line(what),
        )
    )


def _json(letter: Letter) -> str:
    import msgspec

    return json.dumps(msgspec.to_builtins(letter), ensure_ascii=False)


async def list_letters(args: argparse.Namespace, settings: Settings) -> int:
    nc = await _open(settings)
    try:
        letters = await _letters(nc, settings).list(args.queue)
    finally:
        await nc.close()
    for letter in letters:
        print(_json(letter) if args.json else letter_line(letter))
    if not letters:
        print("chorus: no dead letters", file=sys.stderr)
    return 0


async def show_letter(args: argparse.Namespace, settings: Settings) -> int:
    nc = await _open(settings)
    try:
        letter = await _letters(nc, settings).get(args.seq)
    finally:
        await nc.close()
    print(_json(letter))
    return 0


async def replay_letters(args: argparse.Namespace, settings: Settings) -> int:
    if args.queue and not args.all:
        raise ConfigError("--queue goes with --all (one SEQ names its letter already)")
    nc = await _open(settings)
    try:
        letters = _letters(nc, settings)
        if args.all:
            replayed = list(await letters.replay_all(args.queue))
        else:
            replayed = [await letters.replay(args.seq)]
    finally:
        await nc.close()
    for each in replayed:
        where = f"to {each.subject}" if each.subject else "(it had run already: letter removed)"
        note = " (the queue had it already)" if each.duplicate and each.subject else ""
        print(f"replayed {each.seq} {where}{note}")
    if not replayed:
        print("chorus: no dead letters", file=sys.stderr)
    return 0


async def purge_letters(args: argparse.Namespace, settings: Settings) -> int:
    what = f"the dead letters of queue {args.queue!r}" if args.queue else "every dead letter"
    if not args.yes:
        raise ConfigError(f"this deletes {what} for good: add --yes to do it")
    nc = await _open(settings)
    try:
        count = await _letters(nc, settings).purge(args.queue)
    finally:
        await nc.close()
    print(f"purged {count} dead letter(s)")
    return 0
