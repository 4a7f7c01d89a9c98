"""`chorus session show ID`: a conversation session's history (KV <prefix>-sessions)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import msgspec
from nats.js.errors import NotFoundError

from chorus.agent.sessions import SessionStore, sessions_named
from chorus.cli.runs import ExamplesFormatter
from chorus.config import Settings
from chorus.nats.connection import connect


def register(sub: Any) -> None:
    session = sub.add_parser(
        "session",
        help="look at conversation sessions",
        description="Conversation sessions: the bounded history each agent keeps per session "
        "id (a task's `session_id`) in the KV bucket <prefix>-sessions, under its own name.",
        epilog="examples:\n  chorus session show chat-42\n"
        "  chorus session show chat-42 --agent chat --json",
        formatter_class=ExamplesFormatter,
    )
    actions = session.add_subparsers(dest="session_command", required=True, metavar="ACTION")
    show = actions.add_parser(
        "show",
        help="print a session's items, oldest first",
        description="Print the session's items, oldest first: `role: content` for messages, "
        "one JSON line for tool calls and outputs. Sessions are kept per agent: without "
        "--agent, the one agent's session of that id is shown (exit status 2 naming the "
        "agents when several have one). Exit status 1 when there is no such session (never "
        "written, or expired after CHORUS_SESSION_TTL).",
        epilog="example: chorus session show chat-42 --agent chat --json",
        formatter_class=ExamplesFormatter,
    )
    show.add_argument("session_id", metavar="ID")
    show.add_argument("--agent", metavar="NAME", help="the agent whose session it is")
    show.add_argument("--json", action="store_true", help="print the whole record as JSON")
    show.set_defaults(func=show_session)


def item_line(item: dict[str, Any]) -> str:
    content = item.get("content")
    if "role" in item and isinstance(content, str):
        return f"{item['role']}: {content}"
    return json.dumps(item, ensure_ascii=False)


async def show_session(args: argparse.Namespace, settings: Settings) -> int:
    nc = await connect(settings, "chorus-session")
    try:
        if args.agent:
            store = SessionStore(nc, settings.subjects, ttl=settings.session_ttl, agent=args.agent)
            found = [await (await store.open()).load(args.session_id)]
        else:
            try:
                found = await sessions_named(nc, settings.subjects, args.session_id)
            except NotFoundError:  # no agent has kept a session yet: no bucket
                found = []
    finally:
        await nc.close()
    found = [session for session in found if session.turns]
    of = f" of agent {args.agent!r}" if args.agent else ""
    if not found:
        print(f"chorus: no session {args.session_id!r}{of}", file=sys.stderr)
        return 1
    if len(found) > 1:
        agents = ", ".join(sorted(session.agent for session in found))
        print(
            f"chorus: agents {agents} each have a session {args.session_id!r}; "
            "pick one with --agent NAME",
            file=sys.stderr,
        )
        return 2
    (session,) = found
    if args.json:
        print(json.dumps(msgspec.to_builtins(session), ensure_ascii=False))
        return 0
    print(
        f"# session {session.session_id} of agent {session.agent}: {session.turns} turns, "
        f"{len(session.items)} items"
    )
    for item in session.items:
        print(item_line(item))
    return 0
