"""A queue message a consumer gave up on, kept on a dead-letter subject with the reason."""

from __future__ import annotations

import msgspec

from chorus.messages.codec import Message, now

KEPT_BYTES = 64 * 1024  # of the original body: enough to see what it was, never too big to send


class RejectedMessage(Message, tag="rejected_message"):
    """A message taken off a work queue without being handled, on `<prefix>.dlq.<queue>`:
    it could not be decoded, or it was delivered `deliveries` times without being
    finished (it kept crashing its consumer or timing out its claim)."""

    queue: str  # runs, or a dispatch target
    subject: str
    code: str  # invalid_message | max_deliveries
    reason: str
    deliveries: int
    stream_sequence: int
    data: bytes  # the original body (base64 in JSON), its first KEPT_BYTES
    truncated: bool = False
    run_id: str | None = None  # when the body was a readable run request
    time: float = msgspec.field(default_factory=now)


def rejected(
    *,
    queue: str,
    subject: str,
    code: str,
    reason: str,
    deliveries: int,
    stream_sequence: int,
    data: bytes,
    run_id: str | None = None,
) -> RejectedMessage:
    """The letter for a message, its body cut to KEPT_BYTES."""
    return RejectedMessage(
        queue=queue,
        subject=subject,
        code=code,
        reason=reason,
        deliveries=deliveries,
        stream_sequence=stream_sequence,
        data=data[:KEPT_BYTES],
        truncated=len(data) > KEPT_BYTES,
        run_id=run_id,
    )
