"""What a queue consumer gives up on goes to a dead-letter subject with the reason."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from chorus.agent import Agent, Context
from chorus.client.durable import TaskQueue
from chorus.client.runs import RunClient
from chorus.config import Settings
from chorus.messages import DeadLetter, RejectedMessage, RunRequest, Task, decode
from chorus.nats.streams import ensure_dispatch_stream, ensure_runs_stream
from chorus.orchestrator.service import CONSUMER, RUN_MAX_DELIVER
from chorus.specs.workflow import Pipeline, Step
from tests.helpers import StartCoordinator, StartHost, StartOrchestrator


async def listen(nc: Client, subject: str) -> asyncio.Queue[Msg]:
    """Core subscribers hear what JetStream stores on `subject`."""
    heard: asyncio.Queue[Msg] = asyncio.Queue()
    await nc.subscribe(subject, cb=heard.put)
    return heard


async def deliver_and_hand_back(nc: Client, stream: str, consumer: str, times: int) -> None:
    """Take the message `times` times and hand it back, as consumers that died would."""
    subscription = await nc.jetstream().pull_subscribe_bind(durable=consumer, stream=stream)
    for _ in range(times):
        [msg] = await subscription.fetch(1, timeout=5)
        await msg.nak()
    await subscription.unsubscribe()


def echo() -> Agent:
    agent = Agent(name="echo", capabilities=["echo"])

    @agent.on_task
    async def answer(task: Task, ctx: Context) -> str:
        return task.input

    return agent


async def test_malformed_run_request_is_dead_lettered_with_the_reason(
    start_orchestrator: StartOrchestrator, nc: Client, settings: Settings
) -> None:
    letters = await listen(nc, settings.subjects.runs_dead_letter)
    await start_orchestrator()

    await nc.jetstream().publish(settings.subjects.run_submit(), b'{"type": "run_request", "in')
    letter = decode((await asyncio.wait_for(letters.get(), 10)).data, RejectedMessage)

    assert letter.queue == "runs"
    assert letter.code == "invalid_message"
    assert letter.reason.startswith("malformed run request:")
    assert letter.data == b'{"type": "run_request", "in'


async def test_run_request_delivered_max_times_is_dead_lettered_and_the_run_failed(
    start_orchestrator: StartOrchestrator, nc: Client, settings: Settings
) -> None:
    s = settings.subjects
    js = nc.jetstream()
    await ensure_runs_stream(js, s)
    await js.add_consumer(
        s.runs_stream,
        ConsumerConfig(
            durable_name=CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=2,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=-1,
            max_deliver=RUN_MAX_DELIVER,
        ),
    )
    letters = await listen(nc, s.runs_dead_letter)
    runs = RunClient(nc, s)
    workflow = Pipeline(name="one", steps=[Step(name="s", agent="nobody", instructions="x")])
    pending = await runs.submit(RunRequest(workflow=workflow, input="q"))
    await deliver_and_hand_back(nc, s.runs_stream, CONSUMER, RUN_MAX_DELIVER - 1)

    await start_orchestrator()
    letter = decode((await asyncio.wait_for(letters.get(), 10)).data, RejectedMessage)
    record = await runs.wait(pending.run_id, timeout=10)

    assert letter.code == "max_deliveries"
    assert letter.run_id == pending.run_id
    assert letter.deliveries == RUN_MAX_DELIVER
    assert f"delivered {RUN_MAX_DELIVER} times" in letter.reason
    assert record.status == "failed"
    assert record.error == letter.reason
    info = await js.consumer_info(s.runs_stream, CONSUMER)
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def test_task_delivered_max_times_is_dead_lettered_and_recorded_failed(
    start_coordinator: StartCoordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    s = settings.subjects
    js = nc.jetstream()
    target = "cap.echo"
    max_deliver = settings.max_attempts + 5
    await ensure_dispatch_stream(js, s)
    await js.add_consumer(
        s.dispatch_stream,
        ConsumerConfig(
            durable_name=s.dispatch_consumer(target),
            filter_subject=s.dispatch(target),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=3,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=-1,
            max_deliver=max_deliver,
        ),
    )
    letters = await listen(nc, s.dead_letter(target))
    queue = TaskQueue(nc, s)
    task = Task(input="hello")
    await queue.submit(task, capability="echo")
    await deliver_and_hand_back(nc, s.dispatch_stream, s.dispatch_consumer(target), max_deliver - 1)

    await start_host(echo())
    await start_coordinator()
    outcome = await queue.wait(task.task_id, timeout=10)
    letter = decode((await asyncio.wait_for(letters.get(), 10)).data, DeadLetter)

    assert outcome.status == "failed"
    assert outcome.errors[-1].code == "max_deliveries"
    assert f"delivered {max_deliver} times" in outcome.errors[-1].reason
    assert letter.task.task_id == task.task_id
    assert letter.errors[-1].code == "max_deliveries"
