"""Giving up on a queue message: keep it on a dead-letter subject with the reason, then ack.

Consumers check `num_delivered` against their `max_deliver` before handling a message
rather than listening for JetStream's MAX_DELIVERIES advisory: the advisory is a core
message, lost when no consumer process is up at that moment, and it carries only the
stream sequence, so the body would have to be fetched back (a permission of its own) from a
work queue that keeps such messages for ever. On its last delivery the consumer still holds
the body and can dead-letter it and take it off the queue in one place.
"""

from __future__ import annotations

import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from chorus.messages import encode, headers, rejected
from chorus.nats import wire

log = logging.getLogger("chorus.nats.dead_letters")

MAX_DELIVERIES = "max_deliveries"  # the code of a message delivered as often as allowed


def delivered_for_the_last_time(msg: Msg, max_deliver: int) -> bool:
    """The server will not deliver `msg` again: handle it now as given up, or lose it."""
    return msg.metadata.num_delivered >= max_deliver


async def dead_letter(
    js: JetStreamContext,
    msg: Msg,
    *,
    subject: str,
    queue: str,
    code: str,
    reason: str,
    run_id: str | None = None,
) -> None:
    """Publish `msg` with `reason` on the dead-letter `subject`, then take it off its queue."""
    meta = msg.metadata
    letter = rejected(
        queue=queue,
        subject=msg.subject,
        code=code,
        reason=reason,
        deliveries=meta.num_delivered,
        stream_sequence=meta.sequence.stream,
        data=msg.data,
        run_id=run_id,
    )
    await wire.publish_durably(js, subject, encode(letter), headers.for_rejected(letter))
    log.error(
        "message dead-lettered",
        extra={"queue": queue, "code": code, "reason": reason, "deliveries": meta.num_delivered},
    )
    await msg.ack_sync(timeout=5)
