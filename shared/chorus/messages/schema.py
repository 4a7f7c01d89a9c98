"""The JSON Schema (2020-12) of every wire message, for clients in other languages."""

from __future__ import annotations

from typing import Any

import msgspec

from chorus.messages import (
    agents,
    approvals,
    control,
    coordination,
    effects,
    runs,
    sessions,
    spend,
    state,
    streams,
)
from chorus.messages.codec import Message

# Imported for their Message subclasses: every wire type is defined in one of these.
_MODULES = (
    agents,
    approvals,
    control,
    coordination,
    effects,
    runs,
    sessions,
    spend,
    state,
    streams,
)


def wire_types() -> list[type[Message]]:
    """Every concrete wire message: the subclasses of Message."""
    found: list[type[Message]] = []
    pending = list(Message.__subclasses__())
    while pending:
        kind = pending.pop(0)
        if kind.__name__ != "RunFields":  # a shared base, never sent on its own
            found.append(kind)
        pending.extend(kind.__subclasses__())
    return found


def schemas() -> dict[str, Any]:
    kinds = wire_types()
    (_, components) = msgspec.json.schema_components(kinds, ref_template="#/$defs/{name}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Chorus wire messages",
        "$defs": components,
        "oneOf": [{"$ref": f"#/$defs/{t.__name__}"} for t in kinds],
    }
