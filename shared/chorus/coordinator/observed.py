"""The coordinator, observed: each dispatch of a queued task as a `process` span, a child of
the span that queued it (its headers are stored with it in JetStream), and the time it
waited in the queue.

Kept out of the dispatcher, which calls in with one line.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from typing import Any

from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind

from chorus.messages import headers
from chorus.telemetry import tracing
from chorus.telemetry.metrics import DispatchInstruments


def dispatching(
    work: Coroutine[Any, Any, None], msg: Msg, target: str, metrics: DispatchInstruments
) -> Coroutine[Any, Any, None]:
    """`work` (one delivery of a queued task being dispatched) as `process <subject>`."""
    delivered = msg.metadata.num_delivered or 1
    if delivered == 1 and msg.metadata.timestamp is not None:
        # The stream's timestamp is when the task was stored: the wait is until now.
        metrics.queue_wait.labels(target).observe(
            max(0.0, time.time() - msg.metadata.timestamp.timestamp())
        )
    received = headers.read(msg.headers)
    attributes = tracing.messaging(
        msg.subject,
        "process",
        message_id=received.msg_id,
        group=msg.metadata.consumer or "",
        delivery=delivered,
    )
    if received.run_id:
        attributes[tracing.RUN_ID] = received.run_id
    return tracing.within(
        work,
        f"process {msg.subject}",
        kind=SpanKind.CONSUMER,
        parent=tracing.parent_of(msg.headers),
        attributes=attributes,
    )
