"""The demo's approval part: a task parks on a tool call that needs a person, someone decides
(`chorus approve ID` in another terminal, or the demo itself with `--approve`), the task
resumes and the model hears the tool's output or the rejection.

The wait is bounded: the announcer's spec expires the approval after 5 minutes (the
coordinator's sweep then tells the model it was rejected); should nothing settle it by the
expiry plus EXPIRY_GRACE_S (no coordinator sweeping), the demo says so and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex

from nats.aio.client import Client
from rich.console import Console
from rich.markup import escape

from chorus.client import TaskQueue
from chorus.client.approvals import ApprovalBook, parse_iso, utc_now
from chorus.config import Settings
from chorus.errors import ChorusError
from chorus.messages import Approval, Result, Task

AGENT = "announcer"  # shared/chorus/examples/agents/announcer.yaml
PARK_WITHIN_S = 60.0  # the model's first turn and the parking, on a loaded machine
EXPIRY_GRACE_S = 30.0  # past the expiry: the sweep (every 5 s) applies it well before this
DECIDER = "chorus demo --approve"


def _left(seconds: float) -> str:
    whole = max(0, int(seconds))
    return f"{whole // 60}:{whole % 60:02d}"


async def show_approval(
    console: Console,
    nc: Client,
    settings: Settings,
    question: str,
    *,
    approve: bool,
    env_setup: str,
    timeout: float,
) -> bool:
    """Run one announcer task through its approval; True when it finished (approved,
    rejected or expired: each is an answer the model gave), False when it did not."""
    book = ApprovalBook(nc, settings.subjects)
    queue = TaskQueue(nc, settings.subjects)
    task = Task(input=question)
    changes: asyncio.Queue[Approval] = asyncio.Queue()

    async def follow() -> None:
        async for approval in book.watch():
            if approval.task_id == task.task_id:
                changes.put_nowait(approval)

    following = asyncio.create_task(follow())
    running = asyncio.create_task(queue.run(task, agent=AGENT, timeout=timeout))
    try:
        console.print(
            f"[bold]task[/] → agent [cyan]{AGENT}[/] (a tool that needs a person's approval)"
        )
        try:
            with console.status(f"{AGENT}: its model calls the announce tool"):
                pending = await _first_pending(changes, running)
        except TimeoutError:
            console.print(f"[red]no approval was asked for within {PARK_WITHIN_S:.0f} s[/]")
            return False
        if pending is None:
            return await _finished(console, running)
        arguments = json.dumps(pending.arguments, ensure_ascii=False)
        console.print(
            f"[yellow]approval pending[/] [bold]{pending.approval_id}[/]: {pending.agent} calls "
            f"{escape(pending.tool)}({escape(arguments)}) ({escape(pending.why)}; expires "
            f"{pending.expires_at}); the task is parked, no process waits"
        )
        if approve:
            decided = await book.decide(
                pending.approval_id, approve=True, reason="the demo runs unattended", by=DECIDER
            )
            console.print(
                f"[green]approved[/] by the demo itself ({DECIDER}), as `chorus approve "
                f"{decided.approval_id}` would: the task resumes on an {AGENT} instance"
            )
        else:
            _print_commands(console, pending, env_setup)
            decided_or_none = await _decision(console, changes, pending)
            if decided_or_none is None:
                console.print(
                    f"[red]nobody decided[/] approval {pending.approval_id} and it did not "
                    f"expire by {pending.expires_at} (is a coordinator running? it applies "
                    "expiries); the demo goes on without it"
                )
                return False
            _print_decision(console, decided_or_none)
        return await _finished(console, running)
    finally:
        for background in (following, running):
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError, ChorusError):
                await background
        await queue.close()


async def _first_pending(
    changes: asyncio.Queue[Approval], running: asyncio.Task[Result]
) -> Approval | None:
    """The task's approval once pending; None when the task ended first or it never came."""
    async with asyncio.timeout(PARK_WITHIN_S):
        while True:
            arriving = asyncio.ensure_future(changes.get())
            await asyncio.wait({arriving, running}, return_when=asyncio.FIRST_COMPLETED)
            if not arriving.done():
                arriving.cancel()
                return None
            approval = arriving.result()
            if approval.status == "pending":
                return approval


def _print_commands(console: Console, pending: Approval, env_setup: str) -> None:
    approval_id = pending.approval_id
    console.print(
        f"decide it in another terminal (the demo waits; at {pending.expires_at} it expires "
        "and the model is told it was rejected):",
        soft_wrap=True,
    )
    if env_setup:
        console.print(f"  {escape(env_setup)}", soft_wrap=True, highlight=False)
    else:
        console.print("  (with the NATS_URL and credentials the demo runs with)")
    reason = shlex.quote("not today")
    for command in (
        f"chorus approve {approval_id}",
        f"chorus reject {approval_id} --reason {reason}",
    ):
        console.print(f"  {command}", soft_wrap=True, highlight=False)


async def _decision(
    console: Console, changes: asyncio.Queue[Approval], pending: Approval
) -> Approval | None:
    """The approval once decided (or expired), live progress meanwhile; None when nothing
    settled it by the expiry plus EXPIRY_GRACE_S."""
    expires = parse_iso(pending.expires_at)
    with console.status("") as status:
        while True:
            left = (expires - utc_now()).total_seconds()
            if left < -EXPIRY_GRACE_S:
                return None
            status.update(
                f"waiting for a decision on {pending.approval_id}: "
                + (
                    f"{_left(left)} left, then it expires (the model is told it was rejected)"
                    if left > 0
                    else "expired, waiting for the coordinator's sweep to apply it"
                )
            )
            try:
                approval = await asyncio.wait_for(changes.get(), 1.0)
            except TimeoutError:
                continue
            if approval.decided:
                return approval


def _print_decision(console: Console, approval: Approval) -> None:
    if approval.status == "approved":
        console.print(f"[green]approved[/] by {escape(approval.decided_by or 'someone')}")
    elif approval.status == "rejected":
        console.print(
            f"[red]rejected[/] by {escape(approval.decided_by or 'someone')}: "
            f"{escape(approval.reason)}"
        )
    else:
        console.print(
            f"[red]{approval.status}[/]: nobody decided in time ({escape(approval.reason)}); "
            "the model is told it was rejected"
        )


async def _finished(console: Console, running: asyncio.Task[Result]) -> bool:
    """The resumed task's tool call and answer."""
    try:
        with console.status(f"the task resumes on an {AGENT} instance"):
            result = await running
    except ChorusError as exc:
        console.print(f"[red]the {AGENT} task did not finish[/]: {escape(exc.reason)}")
        return False
    for call in result.tool_calls:
        outcome = f"[red]{escape(call.error)}[/]" if call.error else escape(call.output[:160])
        decided = f" ({call.approval})" if call.approval else ""
        console.print(
            f"  [magenta]tool call[/] turn {call.turn}: {escape(call.name)}"
            f"({escape(call.arguments[:80])}){decided} → {outcome}"
        )
    console.print(f"[bold]output[/]: {escape(result.output)}\n")
    return True
