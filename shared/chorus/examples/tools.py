"""Python tools of the example agents: a glossary lookup the offline demo can call."""

from __future__ import annotations

import msgspec

from chorus.tools import tool

GLOSSARY: dict[str, str] = {
    "nats": "a messaging system: subjects, request-reply, queue groups",
    "jetstream": "NATS persistence: streams, durable consumers, acks and redelivery",
    "kv": "a key-value store on JetStream, with revisions and watches",
    "queue group": "subscribers that share a subject's messages, one receiver per message",
    "chorus": "a runtime for teams of LLM agents running as separate processes over NATS",
}


class Entry(msgspec.Struct, frozen=True):
    term: str
    definition: str


@tool
def define(text: str, limit: int = 3) -> list[Entry]:
    """Look up the glossary terms that appear in a text.

    Args:
        text: the question or phrase to look terms up in
        limit: how many entries to return at most
    """
    lowered = text.lower()
    found = [Entry(term, meaning) for term, meaning in GLOSSARY.items() if term in lowered]
    return found[:limit]


@tool
def announce(text: str) -> str:
    """Post an announcement to the team's notice board (an example: it posts nowhere, it
    answers what it would post). The announcer agent's spec makes every call wait for a
    person's approval.

    Args:
        text: the announcement
    """
    return f"posted to the notice board: {text}"
