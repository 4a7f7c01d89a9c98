"""The effect ledger's records: one per side-effect tool call (KV `<prefix>-effects`)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from chorus.messages.codec import Message, now

# started: the intent is written and the tool is running (or died running);
# done / failed: the tool's output or error is recorded, and is what every retry gets;
# in_doubt: a retry found the intent without a result and nothing could settle it.
EffectStatus = Literal["started", "done", "failed", "in_doubt"]


class EffectRecord(Message, tag="effect"):
    """A side-effect tool call, keyed by what stays the same when its task is retried."""

    key: str
    scope: str  # the task identity that survives retries (ToolCallContext.effect_scope)
    tool: str
    arguments_hash: str  # sha256 of the arguments as canonical JSON
    occurrence: int  # the n-th call of this tool with these arguments in the scope
    status: EffectStatus
    instance: str = ""  # the instance that started the call
    attempt: int = 1  # the attempt of the task that started it
    started_at: float = msgspec.field(default_factory=now)
    finished_at: float = 0.0
    output: Any = None
    error: str = ""
    reconciled: bool = False  # settled by the tool's `reconcile` after being in doubt
