"""Shared state entries (KV `<prefix>-state`, `chorus.state`): values and lock leases."""

from __future__ import annotations

from typing import Any

import msgspec

from chorus.messages.codec import Message, now


class StateEntry(Message, tag="state_entry"):
    """A stored shared-state value with who wrote it and when, so watchers can tell.

    Deletes carry one too (with `value` null) beside the `KV-Operation: DEL` header.
    """

    value: Any = None
    writer: str = ""
    time: float = msgspec.field(default_factory=now)


class LockEntry(Message, tag="lock_entry"):
    """A held lock: key `_lock.<name>` in the state bucket, removed by the server after `ttl_s`."""

    holder: str
    lease_id: str
    ttl_s: float
    acquired_at: float = msgspec.field(default_factory=now)
    # The fencing token: the revision the lease was acquired at. 0 in that first write itself.
    token: int = 0
