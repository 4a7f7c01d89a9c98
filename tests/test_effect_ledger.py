"""The effect ledger: a side-effect tool runs once per call however often its task is
retried, and a call cut short by a killed process is in doubt, never silently repeated."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.agent import Agent
from chorus.client import ChorusClient
from chorus.config import Settings
from chorus.errors import EffectInDoubt, ToolFailed
from chorus.messages import Task
from chorus.tools import tool
from chorus.tools.base import ToolCallContext, ToolDefinition
from chorus.tools.ledger import RERUN, EffectLedger
from tests.effects_child import ARGUMENTS, SendMail, executions
from tests.helpers import ROOT, Reap, StartHost, child_env


class Charge:
    """An in-process side effect that counts its executions."""

    definition = ToolDefinition(name="charge", side_effect=True)

    def __init__(self, fail: bool = False) -> None:
        self.runs: list[dict[str, Any]] = []
        self.fail = fail

    async def call(self, arguments: dict[str, Any], ctx: ToolCallContext) -> Any:
        self.runs.append(arguments)
        if self.fail:
            raise ToolFailed("card declined")
        return {"charged": arguments["amount"], "receipt": f"r{len(self.runs)}"}


def ctx(scope: str, attempt: int = 1, instance: str = "payer-a1") -> ToolCallContext:
    return ToolCallContext(
        agent="payer",
        instance=instance,
        task_id=f"{scope}-{attempt}",
        attempt=attempt,
        effect_scope=scope,
    )


@pytest.fixture
def ledger(nc: Client, settings: Settings) -> EffectLedger:
    return EffectLedger(nc, settings.subjects)


async def test_side_effect_tool_runs_once_and_its_result_is_recorded(ledger: EffectLedger) -> None:
    charge = Charge()

    out = await ledger.wrap(charge).call({"amount": 5}, ctx("order1"))

    assert out == {"charged": 5, "receipt": "r1"}
    assert len(charge.runs) == 1
    (record,) = await ledger.records("order1")
    assert (record.status, record.tool, record.output) == ("done", "charge", out)


async def test_retry_with_the_same_scope_returns_the_recorded_result_without_running(
    ledger: EffectLedger,
) -> None:
    charge = Charge()
    tool = ledger.wrap(charge)
    first = await tool.call({"amount": 5}, ctx("order2", attempt=1))

    again = await tool.call({"amount": 5}, ctx("order2", attempt=2, instance="payer-b2"))

    assert again == first
    assert len(charge.runs) == 1


async def test_a_recorded_failure_is_given_to_the_retry_without_running(
    ledger: EffectLedger,
) -> None:
    charge = Charge(fail=True)
    tool = ledger.wrap(charge)
    with pytest.raises(ToolFailed, match="card declined"):
        await tool.call({"amount": 5}, ctx("order3", attempt=1))

    with pytest.raises(ToolFailed, match="card declined"):
        await tool.call({"amount": 5}, ctx("order3", attempt=2))
    assert len(charge.runs) == 1


async def test_the_same_call_twice_in_one_attempt_runs_twice(ledger: EffectLedger) -> None:
    charge = Charge()
    tool = ledger.wrap(charge)

    outs = [await tool.call({"amount": 5}, ctx("order4")) for _ in range(2)]

    assert [o["receipt"] for o in outs] == ["r1", "r2"]
    assert sorted(r.occurrence for r in await ledger.records("order4")) == [1, 2]


async def test_a_tool_without_side_effects_is_not_wrapped(ledger: EffectLedger) -> None:
    class Lookup:
        definition = ToolDefinition(name="lookup")

        async def call(self, arguments: dict[str, Any], ctx: ToolCallContext) -> Any:
            return "x"

    lookup = Lookup()
    assert ledger.wrap(lookup) is lookup


# across processes: a child process makes the call (tests/effects_child.py)


@pytest.fixture
async def started(nc: Client, settings: Settings) -> AsyncIterator[asyncio.Queue[Msg]]:
    """Every `started` announcement of a SendMail execution, in order."""
    arrived: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_started(msg: Msg) -> None:
        arrived.put_nowait(msg)

    sub = await nc.subscribe(f"{settings.prefix}.test.started", cb=on_started)
    yield arrived
    await sub.unsubscribe()


def run_child(settings: Settings, scope: str, count: Path, reap: Reap) -> subprocess.Popen[bytes]:
    return reap(
        subprocess.Popen(
            [sys.executable, "-m", "tests.effects_child", scope, str(count)],
            cwd=ROOT,
            env=child_env(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    )


async def kill_mid_call(
    settings: Settings, scope: str, count: Path, reap: Reap, started: asyncio.Queue[Msg]
) -> None:
    """A child process starts the call; it is SIGKILLed while the tool runs."""
    child = run_child(settings, scope, count, reap)
    try:
        await asyncio.wait_for(started.get(), 20)
    except TimeoutError:
        child.kill()
        raise AssertionError(child.communicate()[1].decode()) from None
    child.kill()  # SIGKILL: no chance to record anything
    await asyncio.to_thread(child.communicate, timeout=10)  # reaped, its pipes closed


@pytest.mark.slow
async def test_call_killed_midway_is_in_doubt_and_not_run_again(
    ledger: EffectLedger,
    nc: Client,
    settings: Settings,
    tmp_path: Path,
    reap: Reap,
    started: asyncio.Queue[Msg],
) -> None:
    count = tmp_path / "executions"
    await kill_mid_call(settings, "mail1", count, reap, started)
    retry = ledger.wrap(SendMail(nc, settings.subjects, count))

    with pytest.raises(EffectInDoubt, match="may or may not have taken effect"):
        await retry.call(ARGUMENTS, ctx("mail1", attempt=2))

    assert executions(count) == 1
    (doubt,) = await ledger.in_doubt("mail1")
    assert (doubt.tool, doubt.instance, doubt.status) == ("send_mail", "mailer-child", "in_doubt")


class CheckedMail(SendMail):
    """SendMail that can ask the mail server whether a message went out."""

    answer: Any = None

    async def reconcile(self, arguments: dict[str, Any], ctx: ToolCallContext) -> Any:
        return self.answer


@pytest.mark.slow
async def test_reconcile_settles_a_call_in_doubt(
    ledger: EffectLedger,
    nc: Client,
    settings: Settings,
    tmp_path: Path,
    reap: Reap,
    started: asyncio.Queue[Msg],
) -> None:
    count = tmp_path / "executions"
    await kill_mid_call(settings, "mail2", count, reap, started)
    checked = CheckedMail(nc, settings.subjects, count)
    checked.answer = {"sent_to": ARGUMENTS["to"], "message_id": "found-in-outbox"}

    out = await ledger.wrap(checked).call(ARGUMENTS, ctx("mail2", attempt=2))

    assert out == checked.answer
    assert executions(count) == 1
    (record,) = await ledger.records("mail2")
    assert (record.status, record.reconciled) == ("done", True)
    assert await ledger.in_doubt("mail2") == []


@pytest.mark.slow
async def test_reconcile_that_finds_nothing_sent_runs_the_call_again(
    ledger: EffectLedger,
    nc: Client,
    settings: Settings,
    tmp_path: Path,
    reap: Reap,
    started: asyncio.Queue[Msg],
) -> None:
    count = tmp_path / "executions"
    await kill_mid_call(settings, "mail3", count, reap, started)
    checked = CheckedMail(nc, settings.subjects, count)
    checked.answer = RERUN
    call = asyncio.create_task(ledger.wrap(checked).call(ARGUMENTS, ctx("mail3", attempt=2)))
    await asyncio.wait_for(started.get(), 10)
    await nc.publish(f"{settings.prefix}.test.release", b"m-2")

    out = await asyncio.wait_for(call, 10)

    assert out == {"sent_to": ARGUMENTS["to"], "message_id": "m-2"}
    assert executions(count) == 2


@pytest.mark.slow
async def test_result_recorded_by_one_process_is_returned_in_another(
    ledger: EffectLedger,
    nc: Client,
    settings: Settings,
    tmp_path: Path,
    reap: Reap,
    started: asyncio.Queue[Msg],
) -> None:
    count = tmp_path / "executions"
    child = run_child(settings, "mail4", count, reap)
    await asyncio.wait_for(started.get(), 20)
    await nc.publish(f"{settings.prefix}.test.release", b"m-1")
    stdout, stderr = await asyncio.to_thread(child.communicate, timeout=20)
    assert child.returncode == 0, stderr.decode()
    retry = ledger.wrap(SendMail(nc, settings.subjects, count))

    out = await retry.call(ARGUMENTS, ctx("mail4", attempt=2))

    assert out == {"sent_to": ARGUMENTS["to"], "message_id": "m-1"}
    assert stdout.decode().strip() == '{"sent_to":"ada@example.com","message_id":"m-1"}'
    assert executions(count) == 1


async def test_an_agent_retrying_a_task_reports_the_side_effect_call_in_doubt(
    ledger: EffectLedger, start_host: StartHost, client: ChorusClient
) -> None:
    ran: list[int] = []
    started = asyncio.Event()

    @tool(side_effect=True)
    async def pay(amount: int) -> str:
        """Pay `amount`."""
        ran.append(amount)
        started.set()
        await asyncio.Event().wait()  # the first attempt's instance dies here
        return "paid"

    # The first attempt: its call starts, then its process is gone (the call is cancelled).
    # It was the payer's too: an agent's ledger keys its records under its name.
    payers = EffectLedger(ledger.nc, ledger.subjects, owner="payer")
    first = asyncio.create_task(payers.call(pay, {"amount": 0}, ctx("job-1", instance="x-1")))
    await asyncio.wait_for(started.wait(), 10)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    # The retry, on an agent whose offline model calls `pay` with the same arguments.
    await start_host(Agent(name="payer", capabilities=["pay"]).use(pay))

    result = await client.run_task(Task(task_id="job-1", input="pay it"), capability="pay")

    [call] = result.tool_calls
    assert "may or may not have taken effect" in call.error
    assert len(result.in_doubt) == 1 and ".pay." in result.in_doubt[0]
    assert ran == [0]  # the body ran once, in the first attempt
