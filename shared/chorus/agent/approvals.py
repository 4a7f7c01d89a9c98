"""Parking a task whose tool calls wait for a person, and going on with it on any instance.

`park` stores what the loop raised (`Parked`): the conversation, the outputs of the calls of
that turn that ran, and one pending `Approval` per call that waits (chorus.client.approvals).
The task then answers `Waiting`: its Result says which approvals it waits for and until when,
and the dispatcher records a `waiting` outcome (not final), so the instance's slot is free and
no process holds the task.

The resume task (same task id, `resume` set) runs the handler again; its first loop goes on
from the parked turn (`resume_start`): an approved call runs now, through the effect ledger
under the approval's own scope (`approval-<id>`, so a resume delivered twice runs it once),
with the edited arguments when the decider gave some; a rejected or expired one gives the
model a rejection to read, not an error. While another approval of the same turn is still
pending the task answers `Waiting` again.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from typing import Any

import msgspec

from chorus.agent.conversation import history_items
from chorus.agent.loop import LoopStart, Parked, WaitingCall, run_tool
from chorus.agent.toolbox import Toolbox
from chorus.client.approvals import ApprovalBook, iso, utc_now
from chorus.llm.base import FunctionCall, FunctionCallOutput
from chorus.messages import Approval, ParkedTask, PendingCall, Task, ToolCallRecord
from chorus.tools.base import Tool, ToolCallContext
from chorus.tools.ledger import EffectLedger, LedgeredTool

__all__ = ["Waiting", "canonical_hash", "park", "resume_start"]


class Waiting(Exception):
    """The task is parked: these approvals must be decided (by `until` at the latest)."""

    def __init__(self, approvals: list[str], until: str, text: str) -> None:
        super().__init__(text)
        self.approvals = approvals
        self.until = until
        self.text = text


def canonical_hash(arguments: dict[str, Any]) -> str:
    """sha256 of the arguments as canonical JSON (keys sorted), in hex."""
    return hashlib.sha256(msgspec.json.encode(arguments, order="sorted")).hexdigest()


def _derived_id(*parts: str) -> str:
    """The same task parked at the same point again (its reply lost, the task redelivered)
    gets the same ids, so its stored approvals stand and no second set appears."""
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


def _waiting_text(approvals: list[Approval]) -> str:
    calls = ", ".join(f"{a.tool} (approval {a.approval_id})" for a in approvals)
    first = approvals[0].approval_id if approvals else "ID"
    return (
        f"waiting for a person's decision on {calls}; decide with `chorus approve {first}` or "
        f"`chorus reject {first} --reason ...`"
    )


async def park(
    book: ApprovalBook,
    parked: Parked,
    task: Task,
    *,
    agent: str,
    instance: str,
    toolbox: Toolbox,
    default_timeout_s: float,
) -> Waiting:
    """Store the parked task and its approvals; the Waiting the task answers with."""
    park_id = _derived_id(task.task_id, task.resume, str(parked.turn))
    now = utc_now()
    approvals: list[Approval] = []
    pending: list[PendingCall] = []
    for index, (call, ran) in enumerate(parked.calls):
        if not isinstance(ran, WaitingCall):
            pending.append(
                PendingCall(
                    call_id=call.call_id,
                    name=call.name,
                    arguments=call.arguments,
                    output=ran.output,
                    record=ran.record,
                )
            )
            continue
        approval = _approval(ran, task, agent, instance, toolbox, park_id, index, now)
        approval = _with_expiry(approval, toolbox, now, default_timeout_s)
        approvals.append(approval)
        pending.append(
            PendingCall(
                call_id=call.call_id,
                name=call.name,
                arguments=call.arguments,
                approval_id=approval.approval_id,
            )
        )
    until = max(a.expires_at for a in approvals)
    record = ParkedTask(
        park_id=park_id,
        agent=agent,
        task=task,
        items=[msgspec.to_builtins(item) for item in parked.items],
        turn=parked.turn,
        pending=pending,
        records=parked.records,
        usage=parked.usage,
        approvals=[a.approval_id for a in approvals],
        created_at=iso(now),
        waiting_until=until,
    )
    await book.park(record, approvals)
    stored = await book.parked(agent, park_id)  # the first park's, if this one is a repeat
    current = [(await book.get(a, agent))[0] for a in stored.approvals]
    return Waiting(stored.approvals, stored.waiting_until, _waiting_text(current))


def _approval(
    waiting: WaitingCall,
    task: Task,
    agent: str,
    instance: str,
    toolbox: Toolbox,
    park_id: str,
    index: int,
    now: datetime.datetime,
) -> Approval:
    policy = toolbox.tools[waiting.call.name].definition.approval
    assert policy is not None
    return Approval(
        approval_id=_derived_id(park_id, str(index)),
        agent=agent,
        tool=waiting.call.name,
        arguments=waiting.arguments,
        arguments_hash=canonical_hash(waiting.arguments),
        task_id=task.task_id,
        park_id=park_id,
        created_at=iso(now),
        expires_at=iso(now),
        run_id=task.run_id,
        step=task.step,
        call_id=waiting.call.call_id,
        instance=instance,
        why=waiting.why,
        editable=policy.edit,
        on_timeout=policy.on_timeout,
    )


def _with_expiry(
    approval: Approval, toolbox: Toolbox, now: datetime.datetime, default_timeout_s: float
) -> Approval:
    policy = toolbox.tools[approval.tool].definition.approval
    timeout = policy.timeout_s if policy is not None and policy.timeout_s else default_timeout_s
    expires = now + datetime.timedelta(seconds=timeout)
    return msgspec.structs.replace(approval, expires_at=iso(expires))


async def resume_start(
    book: ApprovalBook,
    task: Task,
    *,
    agent: str,
    toolbox: Toolbox,
    ledger: EffectLedger | None,
    context: ToolCallContext,
) -> tuple[LoopStart, ParkedTask]:
    """Where the resumed loop goes on; Waiting while an approval of its turn is pending."""
    approval, _ = await book.get(task.resume, agent)
    parked = await book.parked(agent, approval.park_id)
    decisions = {a: (await book.get(a, agent))[0] for a in parked.approvals}
    undecided = [a for a in decisions.values() if not a.decided]
    if undecided:
        until = max(a.expires_at for a in undecided)
        raise Waiting([a.approval_id for a in undecided], until, _waiting_text(undecided))
    items = list(history_items(parked.items))
    records = list(parked.records)
    for call in parked.pending:
        if not call.approval_id:
            output, record = call.output, call.record
        else:
            output, record = await _decided(
                decisions[call.approval_id], call, toolbox, ledger, context, parked.turn
            )
        items.append(FunctionCallOutput(call_id=call.call_id, output=output))
        if record is not None:
            records.append(record)
    start = LoopStart(items=items, turn=parked.turn + 1, records=records, usage=parked.usage)
    return start, parked


async def _decided(
    approval: Approval,
    call: PendingCall,
    toolbox: Toolbox,
    ledger: EffectLedger | None,
    context: ToolCallContext,
    turn: int,
) -> tuple[str, ToolCallRecord]:
    """What the model reads for one decided call, and its record; an approved one runs."""
    if approval.status != "approved":
        why = approval.reason or "no reason given"
        told: dict[str, Any] = {
            "rejected": True,
            "by": approval.decided_by or "a person",
            "reason": why,
            "note": "a person did not approve this call, so it did not run; do not call it "
            "again with the same arguments: answer without it, or say what you need",
        }
        if approval.status == "expired":
            told["note"] = f"nobody decided in time, so it did not run: {told['note']}"
        output = json.dumps(told)
        record = ToolCallRecord(
            name=call.name,
            call_id=call.call_id,
            arguments=call.arguments,
            output=output,
            turn=turn,
            approval=approval.status,
            approval_id=approval.approval_id,
        )
        return output, record
    arguments = approval.runs_with
    tool = toolbox.tools.get(call.name)
    once: list[Tool] = []
    if tool is not None:
        inner = tool.tool if isinstance(tool, LedgeredTool) else tool
        # A ledger of its own: its count of identical calls starts at 1 on every resume; keys
        # under the agent's name, as its permissions allow (chorus.auth.permissions).
        fresh = (
            EffectLedger(ledger.nc, ledger.subjects, owner=ledger.owner)
            if ledger is not None
            else None
        )
        once = [LedgeredTool(inner, fresh) if fresh is not None else inner]
    # The approval's own scope: a resume delivered twice finds the first run's outcome.
    ctx = dataclasses.replace(
        context, call_id=approval.call_id, effect_scope=f"approval-{approval.approval_id}"
    )
    done = await run_tool(
        Toolbox(once),
        FunctionCall(call_id=call.call_id, name=call.name, arguments=json.dumps(arguments)),
        ctx,
        turn,
    )
    output = done.output
    if approval.edited_arguments is not None:
        output = json.dumps(
            {
                "note": "a person approved this call with edited arguments",
                "arguments": arguments,
                "output": output,
            }
        )
    record = msgspec.structs.replace(
        done.record, approval="approved", approval_id=approval.approval_id
    )
    return output, record
