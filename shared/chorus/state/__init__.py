"""Shared state on JetStream KV: values, revision-checked updates, watches, locks as leases."""

from chorus.state.locks import Lease, LockContext
from chorus.state.store import SharedState, StateStats
from chorus.state.values import StateValue
from chorus.state.watch import StateWatch, WatchCallback

__all__ = [
    "Lease",
    "LockContext",
    "SharedState",
    "StateStats",
    "StateValue",
    "StateWatch",
    "WatchCallback",
]
