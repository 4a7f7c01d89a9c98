"""Conversation sessions: a bounded history per agent and session id, in KV, shared by every
replica of the agent.

The record of agent `a`'s session `s` is the key `session.a.s` of the bucket
`<prefix>-sessions` (history 1; it expires CHORUS_SESSION_TTL after its last write). The
agent name in every key lets NATS permissions give an agent its own sessions only: another
agent's task with the same session id is another conversation. Reads are direct gets, the
key in the API subject (the bucket has `allow_direct`). `append` is a compare-and-set on the
record's revision, retried on conflict by reloading and re-appending, so two replicas never
lose each other's turns, and turn 2 answered by another replica sees turn 1. History is
bounded: the oldest items go first, by count and by encoded bytes, and a tool output whose
call was dropped goes with it (a model API refuses an output without its call).

Two tasks for one session at once: `store.turn(session_id, policy)` (chorus.agent.turns)
runs them one at a time in arrival order, rejects the second, or interrupts the first.

    store = await SessionStore(
        nc, settings.subjects, ttl=settings.session_ttl, agent=spec.name
    ).open()
    async with store.turn(task.session_id, spec.session.policy):
        history = (await store.load(task.session_id)).items
        ...  # run the model on history + the new input
        await store.append(task.session_id, new_items, max_items=50, max_bytes=65536)
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from chorus.agent.turns import DEFAULT_TICKET_TTL_S, TurnContext, Turns
from chorus.errors import Conflict, InvalidMessage
from chorus.messages import Session, decode, encode, now
from chorus.nats.jetstream import last_values
from chorus.nats.streams import ensure_sessions_bucket, open_bucket
from chorus.subjects import Subjects, check_token

__all__ = ["SessionStore", "bound_items", "sessions_named"]

log = logging.getLogger("chorus.agent.sessions")

_CAS_ATTEMPTS: Final = 50
_TOOL_OUTPUTS: Final = ("function_call_output", "tool_result", "tool_output")


def _is_tool_output(item: dict[str, Any]) -> bool:
    return item.get("type") in _TOOL_OUTPUTS or item.get("role") == "tool"


def bound_items(
    items: Sequence[dict[str, Any]], *, max_items: int, max_bytes: int
) -> list[dict[str, Any]]:
    """The newest items that fit in `max_items` and `max_bytes` (as encoded JSON), without a
    leading tool output whose call was dropped. An item bigger than `max_bytes` on its own
    is not kept."""
    if max_items < 1 or max_bytes < 2:
        raise InvalidMessage(
            f"session bounds must be at least 1 item and 2 bytes, got {max_items} and {max_bytes}"
        )
    kept = list(items[-max_items:])
    sizes = [len(msgspec.json.encode(item)) for item in kept]
    total = 2 + sum(sizes) + max(len(sizes) - 1, 0)  # brackets and commas
    start = 0
    while start < len(kept) and (total > max_bytes or _is_tool_output(kept[start])):
        total -= sizes[start] + (1 if start < len(kept) - 1 else 0)
        start += 1
    return kept[start:]


class SessionStore:
    """Load and append to sessions, and order their turns (`turn`)."""

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        ttl: float,
        *,
        agent: str,
        holder: str = "",
        ticket_ttl_s: int = DEFAULT_TICKET_TTL_S,
        replicas: int | None = None,
    ) -> None:
        """`agent`: the agent name whose sessions these are (the second token of each key).
        `replicas`: the bucket's copies in a cluster (CHORUS_REPLICAS; None: one when
        created, an existing bucket's left alone)."""
        self.nc = nc
        self.replicas = replicas
        self.subjects = subjects
        self.ttl = ttl
        self.agent = check_token(agent, "session owner (agent name)")
        self.holder = holder or f"{socket.gethostname()}-{os.getpid()}"
        self.turns = Turns(
            nc, subjects, agent=self.agent, holder=self.holder, ticket_ttl_s=ticket_ttl_s
        )
        self._kv: KeyValue | None = None

    async def open(self) -> SessionStore:
        """Create the bucket (or adopt it); returns self."""
        js = self.nc.jetstream()
        self._kv = await open_bucket(
            js,
            self.subjects.sessions_bucket,
            lambda: ensure_sessions_bucket(js, self.subjects, self.ttl, replicas=self.replicas),
        )
        return self

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("SessionStore.open() was not awaited")
        return self._kv

    async def _read(self, session_id: str) -> tuple[Session, int]:
        key = self.subjects.session_key(self.agent, session_id)
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:  # never written, deleted, or expired
            return Session(session_id=session_id), 0
        if not entry.value:
            return Session(session_id=session_id), entry.revision or 0
        return decode(entry.value, Session), entry.revision or 0

    async def load(self, session_id: str) -> Session:
        """The session's record; an empty one when the session is new (or expired)."""
        session, _ = await self._read(session_id)
        return session

    async def append(
        self,
        session_id: str,
        new_items: Sequence[dict[str, Any]],
        *,
        max_items: int,
        max_bytes: int,
    ) -> Session:
        """Add one turn's items after whatever is stored now, keeping the bounds."""
        return await self._change(
            session_id, lambda items: [*items, *new_items], max_items=max_items, max_bytes=max_bytes
        )

    async def _change(
        self,
        session_id: str,
        change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
        *,
        max_items: int,
        max_bytes: int,
    ) -> Session:
        key = self.subjects.session_key(self.agent, session_id)
        for _ in range(_CAS_ATTEMPTS):
            current, revision = await self._read(session_id)
            updated = Session(
                session_id=session_id,
                agent=self.agent,
                items=bound_items(change(current.items), max_items=max_items, max_bytes=max_bytes),
                turns=current.turns + 1,
                updated_at=now(),
            )
            try:
                if revision:
                    await self.kv.update(key, encode(updated), last=revision)
                else:
                    await self.kv.create(key, encode(updated))
            except KeyWrongLastSequenceError:
                continue  # another replica appended first: re-read and re-append
            return updated
        raise Conflict(
            f"session {session_id!r} changed {_CAS_ATTEMPTS} times while appending; try again"
        )

    def turn(
        self,
        session_id: str,
        policy: str = "enqueue",
        *,
        on_interrupt: Callable[[], object] | None = None,
        timeout: float = 600.0,
    ) -> TurnContext:
        """Hold the session's turn for the block (see chorus.agent.turns)."""
        return self.turns.turn(session_id, policy, on_interrupt=on_interrupt, timeout=timeout)


async def sessions_named(nc: Client, subjects: Subjects, session_id: str) -> list[Session]:
    """Every agent's session of this id (`session.*.<id>`), for the operator's
    `chorus session show ID` without `--agent`: one snapshot read of the bucket."""
    pattern = subjects.session_subject(subjects.session_keys_of_id(session_id))
    messages = await last_values(nc.jetstream(), subjects.sessions_stream, pattern)
    return [decode(m.data, Session) for m in messages if m.data]
