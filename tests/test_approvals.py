"""Durable tool approvals: a call that needs a person parks its task (no process waits), a
decision is taken once, and the task resumes on any instance with the tool run at most once."""

from __future__ import annotations

import asyncio
import json
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
from tests.helpers import SpawnAgent, StartCoordinator, StartHost, child_env, write_spec

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
    with pytest.raises(InvalidSpec, match=r"only `args`.*data"):
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


# over HTTP


async def test_the_gateway_lists_and_decides_approvals_once(
    coordinator: object,
    start_host: StartHost,
    queue: TaskQueue,
    nc: Client,
    settings: Settings,
    charges: Path,
) -> None:
    from tests.test_gateway import running_gateway

    model = OfflineModel(script=charging({"memo": "march"}))
    pending = await pending_approvals(nc, settings)
    await start_host(cashier(), model=model)
    running, approval = await parked(queue, pending)
    path = f"/api/approvals/{approval.approval_id}"
    async with running_gateway(nc, settings) as http:
        listed = (await http.get("/api/approvals")).json()["approvals"]
        assert [a["approval_id"] for a in listed] == [approval.approval_id]
        bad = await http.post(path, json={"decision": "maybe"})
        assert bad.status_code == 400 and "decision" in bad.json()["error"]["reason"]

        decided = await http.post(path, json={"decision": "reject", "reason": "not today"})
        again = await http.post(path, json={"decision": "approve"})
        unknown = await http.post("/api/approvals/0123456789abcdef", json={"decision": "approve"})

        assert decided.status_code == 200 and decided.json()["status"] == "rejected"
        assert decided.json()["decided_by"] == "gateway:anonymous"
        assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
        assert unknown.status_code == 404
        assert (await http.get("/api/approvals")).json()["approvals"] == []
    result = await asyncio.wait_for(running, WAIT_S)
    assert json.loads(result.output.removeprefix("done: "))["reason"] == "not today"
    assert executions(charges) == []


# across processes

CASHIER_SPEC = f"""\
name: cashier
instructions: Take payments.
tools:
  - python: {CHARGE}
    approval: required
"""


def chorus(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chorus", *args],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_task_parked_by_a_killed_agent_resumes_on_a_new_one_and_charges_once(
    coordinator: object,
    spawn_agent: SpawnAgent,
    queue: TaskQueue,
    nc: Client,
    settings: Settings,
    tmp_path: Path,
    charges: Path,
) -> None:
    spec = write_spec(tmp_path, "cashier", CASHIER_SPEC)
    pending = await pending_approvals(nc, settings)
    first = await spawn_agent(spec)
    running, approval = await parked(queue, pending)
    assert (await recorded_outcome(nc, settings, approval.task_id)).status == "waiting"

    first.signal(signal.SIGKILL)
    first.wait(10)
    listed = chorus(settings, "approvals", "--json")
    assert [a["approval_id"] for a in json.loads(listed.stdout)] == [approval.approval_id]
    approved = chorus(settings, "approve", approval.approval_id, "--reason", "ok")
    assert approved.returncode == 0, approved.stderr
    assert "approved" in approved.stdout
    again = chorus(settings, "reject", approval.approval_id, "--reason", "changed my mind")
    assert again.returncode == 2 and "approved already" in again.stderr
    await spawn_agent(spec)  # the decision waits in the queue for an instance
    result = await asyncio.wait_for(running, WAIT_S * 2)

    assert executions(charges) == [{"memo": "bill ada", "amount": 500}]
    assert "tool charge: charged 500 for bill ada" in result.output
    assert result.instance != first.instance


async def test_a_workflow_step_waits_across_an_orchestrator_kill_and_completes(
    coordinator: object,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
    tmp_path: Path,
    reap: Any,
    book: ApprovalBook,
    charges: Path,
) -> None:
    from chorus.client.runs import RunClient
    from chorus.messages import RunRequest
    from chorus.workflows import Pipeline, Step
    from tests.helpers import stop_child
    from tests.test_orchestrator import spawn_orchestrator

    await start_host(cashier())
    pending = await pending_approvals(nc, settings)
    runs = RunClient(nc, settings.subjects)
    log = tmp_path / "orchestrator.log"
    first = reap(spawn_orchestrator(settings, log))
    workflow = Pipeline(name="billing", steps=[Step(agent="cashier")])
    request = RunRequest(workflow=workflow, input="bill bob")
    await runs.submit(request)
    approval = await asyncio.wait_for(pending.get(), WAIT_S * 2)
    assert approval.run_id == request.run_id

    first.kill()
    first.wait(10)
    second = reap(spawn_orchestrator(settings, log))
    await book.decide(approval.approval_id, approve=True, by="tester")
    record = await runs.wait(request.run_id, timeout=40)
    assert stop_child(second) == 0, log.read_text()

    assert record.status == "completed", record.error
    assert executions(charges) == [{"memo": "bill bob", "amount": 500}]
    assert "charged 500 for bill bob" in (record.output or "")


async def test_a_parked_task_survives_a_nats_server_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uuid

    from chorus.local import wait_for_instances
    from chorus.nats.connection import connect
    from chorus.nats.server import NatsServer
    from tests.helpers import stop_child
    from tests.test_server_restart import spawn

    charges = tmp_path / "charges.jsonl"
    charges.touch()
    monkeypatch.setenv("CHORUS_TEST_CHARGES", str(charges))
    server = NatsServer(tmp_path / "js").start()
    settings = Settings(
        nats_url=server.url, prefix=f"r{uuid.uuid4().hex[:6]}", heartbeat_interval=0.2
    )
    spec = write_spec(tmp_path, "cashier", CASHIER_SPEC)
    children = [
        spawn(settings, tmp_path / "coordinator.log", "coordinator"),
        spawn(settings, tmp_path / "cashier.log", "agent", "run", str(spec)),
    ]
    reconnected = asyncio.Event()
    nc = await connect(
        msgspec.structs.replace(settings, connect_wait=10),
        "test",
        service=True,
        reconnected=reconnected,
    )
    queue = TaskQueue(nc, settings.subjects)
    try:
        await wait_for_instances(nc, settings.subjects, {"cashier": 1}, 30)
        pending = await pending_approvals(nc, settings)
        running, approval = await parked(queue, pending, "bill eve")
        await recorded_outcome(nc, settings, approval.task_id)

        server.stop()
        server.start()
        await asyncio.wait_for(reconnected.wait(), 20)

        book = ApprovalBook(nc, settings.subjects)
        assert (await book.get(approval.approval_id))[0].status == "pending"
        await book.decide(approval.approval_id, approve=True)
        result = await asyncio.wait_for(running, 60)
    finally:
        await queue.close()
        await nc.close()
        for child in children:
            child.terminate()
        codes = [stop_child(child, 30) for child in children]
        server.stop()

    assert "charged 500 for bill eve" in result.output
    assert executions(charges) == [{"memo": "bill eve", "amount": 500}]
    assert codes == [0, 0]
