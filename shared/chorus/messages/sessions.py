"""Conversation sessions (KV `<prefix>-sessions`, `chorus.agent.sessions`): the record of a
session's history, the tickets that order its turns, and the interrupt a newer turn sends."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from chorus.messages.codec import Message, now

SessionPolicy = Literal["enqueue", "reject", "interrupt"]


class Session(Message, tag="session"):
    """A session's bounded history, key `session.<id>`.

    `items` are conversation items as plain JSON objects: `{role, content}` messages and the
    tool call / tool output objects of the model's API, oldest first.
    """

    session_id: str
    agent: str = ""
    items: list[dict[str, Any]] = []
    turns: int = 0  # appends so far (items may have been dropped since)
    updated_at: float = msgspec.field(default_factory=now)


class TurnTicket(Message, tag="turn_ticket"):
    """A task holding or waiting for a session's turn, key `turn.<id>.<ticket>`, stored with a
    TTL and renewed while its holder lives. Turns go in the order of the tickets' first
    revisions: `order` carries it in renewals (0 in the first write, whose revision it is)."""

    holder: str
    ticket_id: str
    policy: SessionPolicy = "enqueue"
    ttl_s: int = 10
    order: int = 0
    created_at: float = msgspec.field(default_factory=now)


class SessionInterrupt(Message, tag="session_interrupt"):
    """Sent on `<prefix>.session.<id>.interrupt` by a turn under policy `interrupt`: every
    turn of the session with a smaller `order` stops."""

    session_id: str
    order: int
    by: str = ""
