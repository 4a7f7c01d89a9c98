"""Durable tool approvals: a call that needs a person parks its task (no process waits), a
decision is taken once, and the task resumes on any instance with the tool run at most once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.agent import Agent
from chorus.client import TaskQueue
from chorus.client.approvals import ApprovalBook
from chorus.config import Settings
from chorus.errors import ConfigError, Conflict, InvalidSpec, NotFound
from chorus.llm.base import FunctionCall, FunctionCallOutput, ModelRequest
from chorus.llm.offline import OfflineModel
from chorus.messages import Approval, Result, Task, TaskOutcome, decode
from chorus.specs.agent import AgentSpec
from chorus.specs.loading import load_yaml
from chorus.specs.tools import ToolSpec
from tests.helpers import ROOT, SpawnAgent, StartCoordinator, StartHost, child_env, write_spec

WAIT_S = 15.0
CHARGE = "tests.approval_tools:charge"


@pytest.fixture
def charges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file the `charge` tool appends one line to per execution (any process)."""
    path = tmp_path / "charges.jsonl"
    path.touch()
    monkeypatch.setenv("CHORUS_TEST_CHARGES", str(path))
    return path


def executions(charges: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in charges.read_text().splitlines()]


def cashier(**approval: Any) -> Agent:
    entry = ToolSpec(python=CHARGE, **{"approval": "required", **approval})
    return Agent(AgentSpec(name="cashier", instructions="Take payments.", tools=[entry]))


def charging(arguments: dict[str, Any]) -> Callable[[ModelRequest], Any]:
    """A model that asks for one charge, then answers with what the tool said."""

    def script(request: ModelRequest) -> Any:
        outputs = [i for i in request.items if isinstance(i, FunctionCallOutput)]
        if not outputs:
            return FunctionCall(call_id="c1", name="charge", arguments=json.dumps(arguments))
        return f"done: {outputs[-1].output}"

    return script


async def pending_approvals(nc: Client, settings: Settings) -> asyncio.Queue[Approval]:
    """Approvals as their agents announce them."""
    found: asyncio.Queue[Approval] = asyncio.Queue()

    async def on_notice(msg: Msg) -> None:
        found.put_nowait(decode(msg.data, Approval))

    await nc.subscribe(settings.subjects.approval_notice("*", "pending"), cb=on_notice)
    await nc.flush()
    return found


async def recorded_outcome(nc: Client, settings: Settings, task_id: str) -> TaskOutcome:
    """The task's outcome once one is stored (a KV watch on its key: no polling)."""
    kv = await nc.jetstream().key_value(settings.subjects.tasks_bucket)
    watcher = await kv.watch(settings.subjects.outcome_key(task_id))
    try:
        async with asyncio.timeout(WAIT_S):
            async for entry in watcher:
                if entry is not None and entry.value:
                    return decode(entry.value, TaskOutcome)
    finally:
        await watcher.stop()
    raise AssertionError("the watch ended")


@pytest.fixture
async def queue(nc: Client, settings: Settings) -> AsyncIterator[TaskQueue]:
    tasks = TaskQueue(nc, settings.subjects)
    yield tasks
    await tasks.close()


@pytest.fixture
async def book(nc: Client, settings: Settings) -> ApprovalBook:
    book = ApprovalBook(nc, settings.subjects)
    await book.bucket()
    return book


async def parked(
    queue: TaskQueue, pending: asyncio.Queue[Approval], text: str = "bill ada"
) -> tuple[asyncio.Task[Result], Approval]:
    task = Task(input=text)
    running = asyncio.create_task(queue.run(task, agent="cashier", timeout=WAIT_S * 2))
    approval = await asyncio.wait_for(pending.get(), WAIT_S)
    assert approval.task_id == task.task_id
    return running, approval


# the spec field


def test_an_unknown_approval_value_is_a_spec_error_naming_the_field(tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path,
        "a",
        f"name: a\ntools:\n  - python: {CHARGE}\n    approval: sometimes please\n",
    )
    with pytest.raises(ConfigError, match=r"tools\[0\].*approval.*required"):
        load_yaml(spec, AgentSpec)


def test_an_approval_condition_may_name_only_args() -> None:
    with pytest.raises(InvalidSpec, match="only `args`.*data"):
        ToolSpec(python=CHARGE, approval="data.amount > 100")


def test_approval_options_without_approval_are_refused() -> None:
    with pytest.raises(InvalidSpec, match="need `approval`"):
        ToolSpec(python=CHARGE, approval_edit=True)


def test_a_condition_that_cannot_be_evaluated_asks_for_a_decision() -> None:
    policy = ToolSpec(python=CHARGE, approval="args.amount > 100").approval_policy
    assert policy is not None
    assert policy.needed({"amount": 101})[0] and not policy.needed({"amount": 5})[0]
    needed, why = policy.needed({"memo": "no amount"})
    assert needed and "amount" in why


# deciding, in one process


async def test_an_approved_call_runs_once_and_the_model_hears_its_output(
    coordinator: object,
    start_host: StartHost,
    queue: TaskQueue,
    book: ApprovalBook,
    nc: Client,
    settings: Settings,
    charges: Path,
) -> None:
    model = OfflineModel(script=charging({"memo": "march", "amount": 900}))
    pending = await pending_approvals(nc, settings)
    await start_host(cashier(), model=model)
    running, approval = await parked(queue, pending)

    assert (approval.tool, approval.arguments, approval.status) == (
        "charge",
        {"memo": "march", "amount": 900},
        "pending",
    )
    assert len(approval.arguments_hash) == 64 and approval.expires_at > approval.created_at
    outcome = await recorded_outcome(nc, settings, approval.task_id)
    assert outcome.status == "waiting"
    assert outcome.waiting_for == [approval.approval_id]
    assert executions(charges) == []  # nothing runs before the decision
    assert [a.approval_id for a in await book.listed(pending_only=True)] == [approval.approval_id]

    await book.decide(approval.approval_id, approve=True, by="tester")
    result = await asyncio.wait_for(running, WAIT_S)

    assert executions(charges) == [{"memo": "march", "amount": 900}]
    assert result.output == "done: charged 900 for march"
    [record] = result.tool_calls
    assert (record.approval, record.approval_id) == ("approved", approval.approval_id)
    stored, _ = await book.get(approval.approval_id)
    assert (stored.status, stored.decided_by, stored.resume_sent) == ("approved", "tester", True)


async def test_a_rejected_call_is_told_to_the_model_as_a_rejection(
    coordinator: object,
    start_host: StartHost,
    queue: TaskQueue,
    book: ApprovalBook,
    nc: Client,
    settings: Settings,
    charges: Path,
) -> None:
    model = OfflineModel(script=charging({"memo": "march"}))
    pending = await pending_approvals(nc, settings)
    await start_host(cashier(), model=model)
    running, approval = await parked(queue, pending)

    await book.decide(approval.approval_id, approve=False, reason="over budget", by="ops")
    result = await asyncio.wait_for(running, WAIT_S)

    assert executions(charges) == []
    told = json.loads(result.output.removeprefix("done: "))
    assert told["rejected"] is True and told["reason"] == "over budget" and told["by"] == "ops"
    [record] = result.tool_calls
    assert record.approval == "rejected" and record.error == ""


async def test_an_edited_approval_runs_the_tool_with_the_edited_arguments(
    coordinator: object,
    start_host: StartHost,
    queue: TaskQueue,
    book: ApprovalBook,
    nc: Client,
    settings: Settings,
    charges: Path,
) -> None:
    model = OfflineModel(script=charging({"memo": "march", "amount": 900}))
    pending = await pending_approvals(nc, settings)
    await start_host(cashier(approval_edit=True), model=model)
    running, approval = await parked(queue, pending)

    await book.decide(approval.approval_id, approve=True, edit={"memo": "march", "amount": 90})
    result = await asyncio.wait_for(running, WAIT_S)

    assert executions(charges) == [{"memo": "march", "amount": 90}]
    told = json.loads(result.output.removeprefix("done: "))
    assert told["arguments"] == {"memo": "march", "amount": 90}
    assert told["output"] == "charged 90 for march"


async def test_edits_are_refused_where_the_tool_does_not_allow_them(
    coordinator: object,
    start_host: StartHost,
    queue: TaskQueue,
    book: ApprovalBook,
    nc: Client,
    settings: Settings,
    charges: Path,
) -> None:
    model = OfflineModel(script=charging({"memo": "march"}))
    pending = await pending_approvals(nc, settings)
    await start_host(cashier(), model=model)
    running, approval = await parked(queue, pending)

    with pytest.raises(ConfigError, match="approval_edit"):
        await book.decide(approval.approval_id, approve=True, edit={"memo": "x"})
    assert (await book.get(approval.approval_id))[0].status == "pending"
    running.cancel()


async def test_a_second_decision_is_a_conflict_and_an_unknown_id_not_found(
    coordinator: object,
    start_host: StartHost,
    queue: TaskQueue,
    book: ApprovalBook,
    nc: Client,
    settings: Settings,
    charges: Path,
) -> None:
    model = OfflineModel(script=charging({"memo": "march"}))
    pending = await pending_approvals(nc, settings)
    await start_host(cashier(), model=model)
    running, approval = await parked(queue, pending)

    await book.decide(approval.approval_id, approve=True)
    with pytest.raises(Conflict, match="approved already"):
        await book.decide(approval.approval_id, approve=False, reason="too late")
    with pytest.raises(NotFound):
        await book.decide("0123456789abcdef", approve=True)
    await asyncio.wait_for(running, WAIT_S)
    assert len(executions(charges)) == 1


async def test_a_false_condition_runs_the_tool_without_asking(
    coordinator: object,
    start_host: StartHost,
    queue: TaskQueue,
    book: ApprovalBook,
    charges: Path,
) -> None:
    model = OfflineModel(script=charging({"memo": "small", "amount": 50}))
    await start_host(cashier(approval="args.amount > 100"), model=model)

    result = await queue.run(Task(input="bill"), agent="cashier", timeout=WAIT_S)

    assert result.output == "done: charged 50 for small"
    assert executions(charges) == [{"memo": "small", "amount": 50}]
    assert await book.listed() == []


async def test_an_expired_approval_takes_its_timeout_action(
    start_coordinator: StartCoordinator,
    start_host: StartHost,
    queue: TaskQueue,
    book: ApprovalBook,
    nc: Client,
    settings: Settings,
    charges: Path,
) -> None:
    await start_coordinator(approval_sweep=0.2)
    model = OfflineModel(script=charging({"memo": "march"}))
    pending = await pending_approvals(nc, settings)
    await start_host(cashier(approval_timeout_s=0.5), model=model)
    running, approval = await parked(queue, pending)

    result = await asyncio.wait_for(running, WAIT_S)

    assert executions(charges) == []
    told = json.loads(result.output.removeprefix("done: "))
    assert told["rejected"] is True and "did not run" in told["note"]
    stored, _ = await book.get(approval.approval_id)
    assert (stored.status, stored.decided_by) == ("expired", "timeout")
