"""The CLI side of the wire: payload input and validation; reading messages for people comes
from `chorus.messages.summary`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec

from chorus import messages
from chorus.errors import ConfigError, InvalidMessage
from chorus.messages import decode

# Reading messages for people is shared with the gateway's console tail, a floor below.
from chorus.messages.summary import (
    PAYLOAD_TYPES,
    agent_of,
    decoded,
    run_id_of,
    short,
    to_builtins,
    tools_line,
    type_of,
)
from chorus.subjects import Subjects

__all__ = [
    "PAYLOAD_TYPES",
    "REPLY_ONLY",
    "agent_of",
    "decoded",
    "prepare",
    "read_payload",
    "run_id_of",
    "short",
    "to_builtins",
    "tools_line",
    "type_of",
]

# Subjects whose requests carry no message of their own: the type above is the reply's.
REPLY_ONLY: frozenset[str] = frozenset({"metrics"})


def read_payload(argument: str | None) -> bytes:
    """DATA as given, `@file` for a file's contents, `-` for standard input, nothing for empty."""
    if argument is None:
        return b""
    if argument == "-":
        return sys.stdin.buffer.read()
    if argument.startswith("@"):
        path = Path(argument[1:])
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return argument.encode()


def prepare(subjects: Subjects, subject: str, payload: bytes) -> bytes:
    """Validate a payload for a Chorus subject (naming the wrong field) and normalise it.

    On an event subject a payload that is not already an Event becomes the event's `data`.
    """
    kind = subjects.classify(subject)
    if kind is None or kind in REPLY_ONLY:
        return payload
    if kind == "event":
        topic = subjects.topic_of(subject)
        try:
            raw = json.loads(payload or b"null")
        except json.JSONDecodeError as exc:
            raise InvalidMessage(f"event data is not JSON: {exc}") from None
        if isinstance(raw, dict) and raw.get("type") == "event":
            event = decode(payload, messages.Event)
            return messages.encode(msgspec.structs.replace(event, topic=topic))
        return messages.encode(messages.Event(topic=topic, data=raw))
    kind_type = PAYLOAD_TYPES.get(kind)
    if kind_type is None:
        return payload
    return messages.encode(decode(payload, kind_type))
