"""Durable dispatch when something is lost on the way: a task or its reply, an outcome stored
while the submitter reconnected, a registry left by an earlier run, a task id submitted again
after the de-duplication window, a step waiting on a task that is being retried."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from chorus.agent import Agent, Context
from chorus.agent.host import AgentHost
from chorus.client.durable import TaskQueue
from chorus.client.runs import RunClient
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.llm.offline import OfflineModel
from chorus.messages import AgentRecord, Heartbeat, RunRequest, Task, decode, encode, headers
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer
from chorus.nats.streams import ensure_agents_bucket, ensure_tasks_bucket
from chorus.nats.wire import publish_durably
from chorus.orchestrator.service import Orchestrator
from chorus.specs.workflow import Pipeline, Step
from tests.coordination import FakeInstance, wait_for_record
from tests.helpers import StartCoordinator, StartHost


def worker(name: str = "worker", *, max_concurrency: int = 4) -> Agent:
    return Agent(name=name, capabilities=["work"], max_concurrency=max_concurrency)


# a task or its reply lost on the way


async def test_heartbeats_list_the_tasks_an_instance_holds(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    release = asyncio.Event()
    agent = worker()

    @agent.on_task
    async def hold(task: Task, ctx: Context) -> str:
        await release.wait()
        return "done"

    host = await start_host(agent)
    beats: asyncio.Queue[Heartbeat] = asyncio.Queue()

    async def on_beat(msg: Msg) -> None:
        await beats.put(decode(msg.data, Heartbeat))

    await nc.subscribe(settings.subjects.heartbeat(host.instance), cb=on_beat)
    running = asyncio.ensure_future(
        nc.request(
            settings.subjects.agent_task(host.instance),
            encode(Task(input="x", task_id="held-1")),
            timeout=10,
        )
    )

    async def next_listing(present: bool) -> Heartbeat:
        while True:
            beat = await asyncio.wait_for(beats.get(), 5)
            if beat.tasks is not None and ("held-1" in beat.tasks) == present:
                return beat

    assert (await next_listing(True)).tasks == ["held-1"]
    release.set()
    await running
    assert (await next_listing(False)).tasks == []


async def test_a_task_that_never_reached_its_instance_goes_elsewhere_at_once_uncounted(
    start_coordinator: StartCoordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    await start_coordinator(task_timeout=60)
    fake = FakeInstance(nc, settings)
    await fake.start()
    queue = TaskQueue(nc, settings.subjects)
    task = Task(input="x")
    started = time.monotonic()
    try:
        await queue.submit(task, capability="work")
        assert (await asyncio.wait_for(fake.received.get(), 10)).task_id == task.task_id
        fake.state = "draining"  # takes nothing more; its heartbeats never list the task
        host = await start_host(worker())

        outcome = await queue.wait(task.task_id, timeout=15)
    finally:
        await fake.stop()

    assert outcome.status == "completed"
    assert outcome.result is not None and outcome.result.instance == host.instance
    assert (outcome.attempts, outcome.errors) == (1, [])  # it never ran: not an attempt
    assert time.monotonic() - started < 15  # not the task timeout of 60 s


async def test_a_task_whose_reply_was_lost_runs_again_at_once_as_a_new_attempt(
    start_coordinator: StartCoordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    await start_coordinator(task_timeout=60)
    fake = FakeInstance(nc, settings)
    await fake.start()
    queue = TaskQueue(nc, settings.subjects)
    task = Task(input="x")
    try:
        await queue.submit(task, capability="work")
        await asyncio.wait_for(fake.received.get(), 10)
        fake.holding = [task.task_id]
        await fake.beat()  # it started the task...
        fake.holding, fake.state = [], "draining"  # ...and its reply never comes
        host = await start_host(worker())

        outcome = await queue.wait(task.task_id, timeout=15)
    finally:
        await fake.stop()

    assert outcome.result is not None and outcome.result.instance == host.instance
    assert outcome.attempts == 2
    assert [(e.code, e.instance) for e in outcome.errors] == [("instance_lost", fake.instance)]


# an outcome stored while the submitter was away


async def test_a_submitter_hears_an_outcome_stored_while_it_was_reconnecting(
    own_nats_server: NatsServer,
) -> None:
    settings = Settings(
        nats_url=own_nats_server.url,
        prefix=f"t{uuid.uuid4().hex[:8]}",
        heartbeat_interval=0.2,
        claim_timeout=30,
    )
    started, release = asyncio.Event(), asyncio.Event()
    agent = worker()

    @agent.on_task
    async def slow(task: Task, ctx: Context) -> str:
        started.set()
        await release.wait()
        return "stored while you were away"

    back = {name: asyncio.Event() for name in ("coordinator", "agent")}
    coordinator_nc = await connect(
        settings, "coordinator", service=True, reconnected=back["coordinator"]
    )
    agent_nc = await connect(settings, "agent", service=True, reconnected=back["agent"])
    submitter = await connect(settings, "submitter", service=True)
    coordinator = Coordinator(coordinator_nc, settings)
    await coordinator.start()
    host = AgentHost(agent, settings, model=OfflineModel(), nc=agent_nc)
    await host.start()
    queue = TaskQueue(submitter, settings.subjects)
    task = Task(input="x")
    try:
        await queue.submit(task, capability="work")
        waiting = asyncio.ensure_future(queue.wait(task.task_id, timeout=30))
        await asyncio.wait_for(started.wait(), 10)
        # The submitter comes back seconds after the others.
        submitter.options["reconnect_time_wait"] = 5
        own_nats_server.kill()
        own_nats_server.start()
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in back.values())), 10)
        tasks = await ensure_tasks_bucket(coordinator_nc.jetstream(), settings.subjects)
        release.set()

        async def stored() -> None:
            # Read, not watched: this test hung twice under load in a KV watch made right
            # after the restart (never told of the outcome, or the outcome never stored: not
            # known); reading tells which, within the deadline.
            key = settings.subjects.outcome_key(task.task_id)
            while True:
                with contextlib.suppress(KeyNotFoundError):
                    if (await tasks.get(key)).value:
                        return
                await asyncio.sleep(0.05)  # a poll of the bucket under the deadline

        await asyncio.wait_for(stored(), 30)
        assert not submitter.is_connected  # stored while the submitter was away

        outcome = await waiting
    finally:
        await queue.close()
        await host.stop(timeout=5)
        await coordinator.stop()
        for client in (submitter, agent_nc, coordinator_nc):
            await client.close()

    assert outcome.result is not None
    assert outcome.result.output == "stored while you were away"


# registry entries left by an earlier coordinator


async def test_an_earlier_coordinators_entry_is_not_healthy_until_its_instance_beats(
    start_coordinator: StartCoordinator, nc: Client, settings: Settings
) -> None:
    agents = await ensure_agents_bucket(nc.jetstream(), settings.subjects)
    ghost = AgentRecord(
        instance="worker-ghost",
        name="worker",
        capabilities=["work"],
        health="healthy",
        state="ready",
        in_flight=0,
        max_concurrency=4,
        processed=3,
        failed=0,
        success_rate=1.0,
        mean_latency_ms=5.0,
        last_seen=time.time() - 30,  # the previous `chorus up`, killed half a minute ago
        started_at=time.time() - 600,
    )
    await agents.put(ghost.instance, encode(ghost))

    await start_coordinator()

    record = await wait_for_record(
        nc, settings, ghost.instance, lambda r: r is None or r.health != "healthy"
    )
    assert record is None or record.health == "dead"


async def test_a_restored_entry_of_a_live_instance_is_healthy_again_at_its_next_beat(
    start_coordinator: StartCoordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    first = await start_coordinator()
    host = await start_host(worker())
    await wait_for_record(nc, settings, host.instance, lambda r: r is not None)
    await first.stop()

    await start_coordinator()

    record = await wait_for_record(
        nc, settings, host.instance, lambda r: r is not None and r.health == "healthy"
    )
    assert record is not None and record.instance == host.instance


# the same task id, later


async def test_a_task_id_resubmitted_after_the_dedupe_window_runs_once_and_answers_the_first(
    start_coordinator: StartCoordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    window = 0.3
    await start_coordinator(dedupe_window=window)
    calls = 0
    agent = worker("once")

    @agent.on_task
    async def count(task: Task, ctx: Context) -> str:
        nonlocal calls
        calls += 1
        return f"run {calls}"

    await start_host(agent)
    queue = TaskQueue(nc, settings.subjects)
    task = Task(input="x", task_id=f"order-{uuid.uuid4().hex[:6]}")

    first = await queue.run(task, capability="work", timeout=10)
    await asyncio.sleep(window * 2)  # the stream forgets the id: that is the point
    again = await queue.run(task, capability="work", timeout=10)

    assert again == first
    assert first.output == "run 1"
    assert calls == 1


async def test_a_queued_copy_of_a_finished_task_is_acked_without_running(
    coordinator: Coordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    runs: list[str] = []
    agent = worker("ordered", max_concurrency=1)

    @agent.on_task
    async def note(task: Task, ctx: Context) -> str:
        runs.append(task.input)
        return task.input

    await start_host(agent)
    queue = TaskQueue(nc, settings.subjects)
    done = Task(input="first", task_id=f"done-{uuid.uuid4().hex[:6]}")
    await queue.run(done, capability="work", timeout=10)
    # What a resubmission after the window looks like in the queue: the same task id, a
    # message the stream accepted (another de-duplication id), from a client that did not
    # look first.
    copy = msgspec.structs.replace(done, input="copy", capability="work")
    sent = {**headers.for_queued_task(copy), headers.MSG_ID_HEADER: "a-later-submission"}
    await publish_durably(
        nc.jetstream(), settings.subjects.dispatch("cap.work"), encode(copy), sent
    )
    later = Task(input="later")
    await queue.submit(later, capability="work")

    await queue.wait(later.task_id, timeout=10)  # dispatched after the copy, in order

    assert runs == ["first", "later"]
    stored = await queue.outcome(done.task_id)
    assert stored is not None and stored.result is not None and stored.result.output == "first"


# a step's wait and the dispatcher's retries


async def test_a_step_waits_out_the_retry_of_a_task_that_timed_out(
    start_coordinator: StartCoordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    tuned = msgspec.structs.replace(settings, task_timeout=1.0, claim_timeout=2)
    await start_coordinator(task_timeout=1.0)
    agent = worker("flaky")

    @agent.on_task
    async def hang_first(task: Task, ctx: Context) -> str:
        if ctx.attempt == 1:
            await asyncio.Event().wait()  # a model call that never returns
        return f"attempt {ctx.attempt}"

    await start_host(agent)
    client = await connect(tuned, "orchestrator")
    orchestrator = Orchestrator(client, tuned)
    await orchestrator.start()
    try:
        runs = RunClient(nc, settings.subjects)
        workflow = Pipeline(name="one", steps=[Step(name="s", capability="work")])
        pending = await runs.submit(RunRequest(workflow=workflow, input="q"))
        record = await runs.wait(pending.run_id, timeout=30)
    finally:
        await orchestrator.stop()
        await client.close()

    assert record.status == "completed", record.error
    assert record.output == "attempt 2"
