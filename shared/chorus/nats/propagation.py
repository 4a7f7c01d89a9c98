"""W3C trace context in NATS headers: added to every message on the way out, read on the way in.

`chorus.nats.wire.outgoing` calls `inject`, so every publish, request, reply and JetStream
publish carries the sender's current span as `traceparent` (and `tracestate`); receivers pass
a message's headers to `extract` to continue the trace. Only the OpenTelemetry API is used:
without an SDK there is never a current span and nothing is added.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current trace context to `headers` (nothing when no span is current)."""
    propagate.inject(headers)


def extract(headers: Mapping[str, str] | None) -> Context:
    """The trace context a message's headers carry (an empty one when they carry none)."""
    return propagate.extract(dict(headers) if headers else {})


def current_traceparent() -> str:
    """The current span as a `traceparent` value; "" when there is none."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get("traceparent", "")


def from_traceparent(traceparent: str) -> Context:
    """The context of a stored `traceparent` (a run head's), to continue its trace."""
    return extract({"traceparent": traceparent} if traceparent else None)


def is_traced(context: Context) -> bool:
    """Whether `context` holds a span to continue."""
    return trace.get_current_span(context).get_span_context().is_valid
