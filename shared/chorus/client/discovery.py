"""What running agents say about themselves: their `$SRV.INFO` replies, read as cards.

Static facts (an agent's description and input schema) come from the instance itself, not
from the coordinator's registry: they need no coordinator (a direct peer call does not), and
they stay out of the heartbeats every instance sends every interval.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.errors import InvalidMessage
from chorus.messages import ServiceInfo, decode
from chorus.nats import wire
from chorus.subjects import Subjects

log = logging.getLogger("chorus.client.discovery")


class AgentCard(msgspec.Struct, frozen=True, kw_only=True):
    """One instance, as peers calling it as a tool see it."""

    agent: str
    instance: str
    capabilities: list[str] = []
    description: str = ""
    input_schema: dict[str, Any] | None = None


Enough = Callable[[list[AgentCard]], bool]


async def describe_agents(
    nc: Client, subjects: Subjects, *, timeout: float = 0.5, enough: Enough | None = None
) -> list[AgentCard]:
    """Every agent instance that answers `$SRV.INFO` within `timeout`, or fewer: the wait
    ends as soon as `enough(cards so far)` holds (nobody knows how many will answer)."""
    cards: list[AgentCard] = []

    def take(msg: Msg) -> bool:
        card = card_of(msg.data)
        if card is not None:
            cards.append(card)
        return enough is not None and enough(cards)

    await wire.gather(nc, subjects.micro_info, timeout=timeout, until=take)
    return cards


def card_of(data: bytes) -> AgentCard | None:
    """The card of one INFO reply; None for a service that is not a Chorus agent, or whose
    metadata cannot be read (logged: one bad instance must not hide the others)."""
    try:
        info = decode(data, ServiceInfo)
    except InvalidMessage as exc:
        log.warning("unreadable $SRV.INFO reply", extra={"error": exc.reason})
        return None
    meta = info.metadata
    if not meta.get("agent") or not meta.get("instance"):
        return None
    schema: dict[str, Any] | None = None
    if meta.get("input_schema"):
        try:
            parsed = json.loads(meta["input_schema"])
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and parsed.get("type") == "object":
            schema = parsed
        else:
            log.warning(
                "ignoring an input_schema that is not a JSON object schema",
                extra={"instance": meta["instance"]},
            )
    return AgentCard(
        agent=meta["agent"],
        instance=meta["instance"],
        capabilities=[c for c in meta.get("capabilities", "").split(",") if c],
        description=meta.get("description", ""),
        input_schema=schema,
    )
