"""`chorus dlq`: dead letters listed with their reason, replayed to their subject, purged."""

from __future__ import annotations

import asyncio
import datetime
import json

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from chorus.agent import Agent, Context
from chorus.client.durable import TaskQueue
from chorus.config import Settings
from chorus.messages import Task
from chorus.nats.dead_letters import dead_letter
from chorus.nats.streams import ensure_dead_letter_stream, ensure_runs_stream
from tests.cli import achorus, one_line_error
from tests.helpers import StartCoordinator, StartHost


def fragile(broken: dict[str, bool]) -> Agent:
    agent = Agent(name="fragile", capabilities=["fragile"])

    @agent.on_task
    async def parse(task: Task, ctx: Context) -> str:
        if broken["now"]:
            raise ValueError("the parser is broken")
        return f"parsed {task.input}"

    return agent


async def test_a_poison_task_is_listed_with_its_reason_and_completes_once_replayed(
    start_coordinator: StartCoordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    s = settings.subjects
    broken = {"now": True}
    await start_host(fragile(broken))
    await start_coordinator(max_attempts=2)
    queue = TaskQueue(nc, s)
    task = Task(input="doc")
    await queue.submit(task, capability="fragile")
    assert (await queue.wait(task.task_id, timeout=30)).status == "failed"

    listed = await achorus(settings, "dlq", "ls")
    (line,) = listed.stdout.splitlines()
    seq, given_up_at, queue_name, deliveries, reason = line.split("  ", 4)
    shown = json.loads((await achorus(settings, "dlq", "show", seq)).stdout)
    broken["now"] = False  # the cause is fixed
    replayed = await achorus(settings, "dlq", "replay", seq)
    outcome = await queue.wait(task.task_id, timeout=30)
    after = await achorus(settings, "dlq", "ls")
    await queue.close()

    assert queue_name == "cap.fragile"
    assert "the parser is broken" in reason
    assert deliveries == "2"  # both attempts
    at = datetime.datetime.fromisoformat(given_up_at)
    assert at.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.UTC) - at).total_seconds()) < 120
    assert (shown["task_id"], shown["subject"]) == (task.task_id, s.dispatch("cap.fragile"))
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.strip() == f"replayed {seq} to {s.dispatch('cap.fragile')}"
    assert outcome.status == "completed"
    assert outcome.result is not None and outcome.result.output == "parsed doc"
    assert after.stdout == "" and "no dead letters" in after.stderr


async def rejected_run_request(nc: Client, settings: Settings, body: bytes) -> None:
    """A run request the runs queue's consumer gave up on, as the orchestrator does it."""
    s = settings.subjects
    js = nc.jetstream()
    await ensure_runs_stream(js, s)
    await ensure_dead_letter_stream(js, s)
    await js.add_consumer(
        s.runs_stream, ConsumerConfig(durable_name="test-runs", ack_policy=AckPolicy.EXPLICIT)
    )
    await js.publish(s.run_submit(), body)
    subscription = await js.pull_subscribe_bind(durable="test-runs", stream=s.runs_stream)
    [msg] = await subscription.fetch(1, timeout=5)
    await dead_letter(
        js,
        msg,
        subject=s.runs_dead_letter,
        queue="runs",
        code="invalid_message",
        reason="malformed run request: truncated",
    )
    await subscription.unsubscribe()
    await js.delete_consumer(s.runs_stream, "test-runs")


async def test_a_rejected_message_replayed_arrives_again_on_its_subject_as_it_was(
    nc: Client, settings: Settings
) -> None:
    s = settings.subjects
    body = b'{"type": "run_request", "in'
    await rejected_run_request(nc, settings, body)
    arrived: asyncio.Queue[Msg] = asyncio.Queue()
    await nc.subscribe(s.run_submit(), cb=arrived.put)
    await nc.flush()

    (letter,) = [
        json.loads(line)
        for line in (await achorus(settings, "dlq", "ls", "runs", "--json")).stdout.splitlines()
    ]
    replayed = await achorus(settings, "dlq", "replay", "--all", "--queue", "runs")
    again = await asyncio.wait_for(arrived.get(), 10)
    after = await achorus(settings, "dlq", "ls")

    assert (letter["queue"], letter["code"], letter["subject"]) == (
        "runs",
        "invalid_message",
        s.run_submit(),
    )
    assert letter["reason"] == "malformed run request: truncated"
    assert replayed.returncode == 0, replayed.stderr
    assert again.data == body
    assert after.stdout == ""
    runs = await nc.jetstream().stream_info(s.runs_stream)
    # The replay waits in the runs queue (the original left it when it was dead-lettered).
    assert (runs.state.messages, runs.state.last_seq) == (1, 2)


async def test_purge_needs_yes_and_then_empties_the_queue(nc: Client, settings: Settings) -> None:
    await rejected_run_request(nc, settings, b"junk")

    refused = await achorus(settings, "dlq", "purge", "--queue", "runs")
    kept = await achorus(settings, "dlq", "ls", "runs")
    purged = await achorus(settings, "dlq", "purge", "--queue", "runs", "--yes")
    after = await achorus(settings, "dlq", "ls", "runs")

    assert "--yes" in one_line_error(refused)
    assert len(kept.stdout.splitlines()) == 1
    assert purged.stdout.strip() == "purged 1 dead letter(s)"
    assert after.stdout == ""


async def test_replaying_a_letter_that_is_gone_says_so(nc: Client, settings: Settings) -> None:
    await ensure_dead_letter_stream(nc.jetstream(), settings.subjects)

    missing = await achorus(settings, "dlq", "replay", "99")

    assert "no dead letter 99" in one_line_error(missing)
