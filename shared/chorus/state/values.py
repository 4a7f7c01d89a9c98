"""What callers get back from shared state, and the stored envelope around a value."""

from __future__ import annotations

from typing import Any

import msgspec

from chorus.errors import InvalidMessage
from chorus.messages import StateEntry, encode
from chorus.state.bucket import PUT, Record

_entry_decoder = msgspec.json.Decoder(StateEntry)
_any_decoder = msgspec.json.Decoder()


class StateValue(msgspec.Struct, frozen=True, kw_only=True):
    """A key's value at one revision, with who wrote it and when.

    Values come back as plain JSON types (dict, list, str, ...): turn them into a Struct with
    `msgspec.convert(value, MyStruct)`. In history and watches `operation` tells a change
    apart: `put`, `delete`, `purge` or `expired` (the value is then None).
    """

    key: str
    value: Any
    revision: int
    writer: str
    time: float
    operation: str = PUT

    @property
    def removed(self) -> bool:
        return self.operation != PUT


def encode_entry(key: str, entry: StateEntry) -> bytes:
    try:
        return encode(entry)
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(f"value for key {key!r} cannot be stored as JSON: {exc}") from None


def to_state_value(record: Record) -> StateValue:
    """Decode a stored message; values written by other KV clients come back as-is."""
    value: Any = None
    writer = ""
    time = record.time
    if record.data:
        try:
            entry = _entry_decoder.decode(record.data)
        except msgspec.DecodeError:
            value = _foreign_value(record.data)
        else:
            value, writer, time = entry.value, entry.writer, entry.time
    return StateValue(
        key=record.key,
        value=None if record.removed else value,
        revision=record.revision,
        writer=writer,
        time=time,
        operation=record.operation,
    )


def _foreign_value(data: bytes) -> Any:
    """A value someone stored without the envelope (`nats kv put`): JSON if it is, else text."""
    try:
        return _any_decoder.decode(data)
    except msgspec.DecodeError:
        return data.decode("utf-8", "replace")
