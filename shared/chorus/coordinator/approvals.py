"""The coordinator's part in approvals: a periodic sweep that applies the timeout action of
expired approvals and sends the resume of decided ones whose decider died first.

One sweep per coordinator, every CHORUS_APPROVAL_SWEEP seconds. Two coordinators sweeping at
once are safe: each change is a compare-and-set, and the loser's is refused.
"""

from __future__ import annotations

import asyncio
import logging

from nats.errors import Error as NatsError

from chorus.client.approvals import ApprovalBook
from chorus.errors import ChorusError

log = logging.getLogger("chorus.coordinator.approvals")


async def sweep_forever(book: ApprovalBook, interval: float) -> None:
    """Sweep now and every `interval` seconds; a failed sweep is logged, the next one runs."""
    while True:
        try:
            expired, resent = await book.sweep()
            if expired or resent:
                log.info("approvals swept", extra={"expired": expired, "resumes_sent": resent})
        except (NatsError, TimeoutError, ChorusError) as exc:
            log.warning("approval sweep failed", extra={"error": repr(exc)})
        await asyncio.sleep(interval)  # a period, not a wait for an event: expiry is a time
