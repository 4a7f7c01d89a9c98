"""Tool calls waiting for a person: the approval record, the parked task, a decision.

KV `<prefix>-approvals`: `approval.<agent>.<id>` holds an `Approval` (pending until decided,
each change compare-and-set on the key's revision) and `parked.<agent>.<park>` the
`ParkedTask` its agent resumes from. Times are ISO 8601 UTC.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from chorus.messages.agents import Task, ToolCallRecord
from chorus.messages.codec import Message, Usage

ApprovalStatus = Literal["pending", "approved", "rejected", "expired"]
TimeoutAction = Literal["reject", "approve"]
DECIDED: frozenset[str] = frozenset({"approved", "rejected", "expired"})


class Approval(Message, tag="approval"):
    """One tool call that waits for a decision before it runs."""

    approval_id: str
    agent: str
    tool: str
    arguments: dict[str, Any]  # exactly as the model gave them
    arguments_hash: str  # sha256 of the arguments as canonical JSON (keys sorted), hex
    task_id: str
    park_id: str  # the ParkedTask the agent resumes from
    created_at: str
    expires_at: str
    run_id: str = ""
    step: str = ""
    call_id: str = ""
    instance: str = ""  # the instance that parked the task
    why: str = ""  # what asked for the decision (`approval: required`, the condition)
    editable: bool = False  # the decider may replace the arguments
    on_timeout: TimeoutAction = "reject"
    decide_scope: str = "execute"  # the gateway scope a key needs to decide (admin may too)
    status: ApprovalStatus = "pending"
    decided_at: str = ""
    decided_by: str = ""
    reason: str = ""  # the decider's reason (a rejection's is told to the model)
    edited_arguments: dict[str, Any] | None = None
    resume_sent: bool = False  # the resume task is stored in the dispatch queue

    @property
    def decided(self) -> bool:
        return self.status in DECIDED

    @property
    def runs_with(self) -> dict[str, Any]:
        """The arguments the tool runs with once approved."""
        return self.edited_arguments if self.edited_arguments is not None else self.arguments


class PendingCall(msgspec.Struct, kw_only=True):
    """One call of the turn a task was parked in: run already, or waiting for a decision."""

    call_id: str
    name: str
    arguments: str  # JSON text, as the model wrote it
    approval_id: str = ""  # empty: it did not need a decision and has run
    output: str = ""  # what the model reads, for a call that has run
    record: ToolCallRecord | None = None


class ParkedTask(Message, tag="parked_task"):
    """What an agent needs to go on with a parked task, on any replica."""

    park_id: str
    agent: str
    task: Task
    items: list[dict[str, Any]]  # the loop's conversation so far (model interface items)
    turn: int  # the model turn whose calls wait
    pending: list[PendingCall]
    records: list[ToolCallRecord] = []  # calls of earlier turns
    usage: Usage = Usage()
    approvals: list[str] = []  # the approval ids of this turn
    created_at: str = ""
    waiting_until: str = ""  # the latest expiry of its approvals


class ApprovalDecision(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A decision, as `POST /api/approvals/{id}` takes it."""

    decision: Literal["approve", "reject"]
    reason: str = ""
    edit: dict[str, Any] | None = None  # replacement arguments (approve only, where allowed)
