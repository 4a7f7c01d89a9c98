"""The codec every wire message shares: the tagged base Struct, JSON encode/decode with errors
that name the field, ids and times.

Unknown fields are ignored so older processes read newer messages. Each message carries a
`type` tag; when a message is decoded as one expected type the tag may be left out, which
keeps hand-written payloads (`chorus req`, `nats req`) short.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, TypeVar, cast

import msgspec

from chorus.errors import InvalidMessage


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> float:
    return time.time()


class Usage(msgspec.Struct, frozen=True):
    """Token usage of one or more model calls, and what they cost.

    `cached_tokens` is the part of `input_tokens` the provider served from its prompt cache
    (priced lower); `usd` is the price of the calls by the price table of the process that
    made them (`chorus.spend.prices`), 0 for a model with no price.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    usd: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.total_tokens + other.total_tokens,
            self.cached_tokens + other.cached_tokens,
            self.usd + other.usd,
        )

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens - other.input_tokens,
            self.output_tokens - other.output_tokens,
            self.total_tokens - other.total_tokens,
            self.cached_tokens - other.cached_tokens,
            self.usd - other.usd,
        )


class Message(msgspec.Struct, tag_field="type", kw_only=True):
    """Base of all wire messages."""


M = TypeVar("M")

_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def encode(message: Any) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, kind: type[M]) -> M:
    """Decode and validate one message; raise InvalidMessage naming what was wrong."""
    return cast(M, _decode(data, kind))


def decode_any(data: bytes, kind: Any) -> Any:
    """`decode` for a union of message types (`Result | ErrorReply`); the caller narrows."""
    return _decode(data, kind)


def _decode(data: bytes, kind: Any) -> Any:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise InvalidMessage(f"invalid {_name(kind)}: {exc}") from None
    except RecursionError:
        # msgspec recurses per nesting level; ~1,000 levels exhaust the interpreter's stack.
        raise InvalidMessage(f"invalid {_name(kind)}: nested too deeply") from None


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("chorus.messages.", "")
