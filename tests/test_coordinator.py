"""The coordinator in-process: registry, routing behaviours, durable dispatch, dead letters."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.agent import Agent, Context
from chorus.client.durable import TaskQueue
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.errors import TaskFailed
from chorus.llm.offline import OfflineModel
from chorus.messages import AgentStatusChange, DeadLetter, Task, decode
from chorus.nats.streams import ensure_dead_letter_stream
from tests.coordination import metrics, wait_for_metrics, wait_for_record
from tests.helpers import StartCoordinator, StartHost


def worker(name: str = "worker", *, capability: str = "work", max_concurrency: int = 4) -> Agent:
    return Agent(name=name, capabilities=[capability], max_concurrency=max_concurrency)


async def test_registry_lists_each_instance_with_health_and_capacity(
    coordinator: Coordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    host = await start_host(worker(max_concurrency=3))

    record = await wait_for_record(nc, settings, host.instance, lambda r: r is not None)

    assert record is not None
    assert record.health == "healthy"
    assert record.name == "worker"
    assert record.capabilities == ["work"]
    assert (record.in_flight, record.max_concurrency) == (0, 3)


async def test_a_submitted_task_is_routed_and_its_result_recorded(
    coordinator: Coordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    host = await start_host(worker())
    queue = TaskQueue(nc, settings.subjects)

    result = await queue.run(Task(input="hello"), capability="work", timeout=10)

    assert result.instance == host.instance
    assert result.output == "[offline] : hello"
    outcome = await queue.outcome(result.task_id)
    assert outcome is not None and outcome.status == "completed"


async def test_the_instance_that_fails_half_its_tasks_gets_fewer(
    coordinator: Coordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    calls: Counter[str] = Counter()
    flaky, steady = worker("flaky"), worker("steady")

    @flaky.on_task
    async def sometimes(task: Task, ctx: Context) -> str:
        calls["flaky"] += 1
        if calls["flaky"] % 2 == 0:
            raise RuntimeError("every second task fails")
        return "ok"

    @steady.on_task
    async def always(task: Task, ctx: Context) -> str:
        calls["steady"] += 1
        return "ok"

    await start_host(flaky)
    await start_host(steady)
    queue = TaskQueue(nc, settings.subjects)

    for i in range(30):
        await queue.run(Task(input=str(i)), capability="work", timeout=10)

    assert calls["steady"] >= 3 * calls["flaky"], calls


async def test_the_fast_instance_gets_more_than_the_slow_one(
    coordinator: Coordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    slow = await start_host(worker("slow"), model=OfflineModel(delay=0.05))
    fast = await start_host(worker("fast"), model=OfflineModel(delay=0.002))
    queue = TaskQueue(nc, settings.subjects)

    served = Counter(
        [
            (await queue.run(Task(input=str(i)), capability="work", timeout=10)).instance
            for i in range(30)
        ]
    )

    assert served[fast.instance] >= 3 * served[slow.instance], served


async def test_a_busy_instance_gets_nothing_new_until_it_frees(
    coordinator: Coordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    gates: dict[str, asyncio.Event] = {}
    started: list[tuple[str, str]] = []
    agents = [worker("a", max_concurrency=1), worker("b", max_concurrency=1)]
    for agent in agents:
        gate = gates[agent.name] = asyncio.Event()

        @agent.on_task
        async def hold(task: Task, ctx: Context, gate: asyncio.Event = gate) -> str:
            started.append((ctx.agent_name, task.input))
            await gate.wait()
            return "done"

        await start_host(agent)
    queue = TaskQueue(nc, settings.subjects)
    first = asyncio.create_task(queue.run(Task(input="1"), capability="work", timeout=20))
    second = asyncio.create_task(queue.run(Task(input="2"), capability="work", timeout=20))
    await wait_for_metrics(nc, settings, lambda m: m.active_jobs == 2)
    third = asyncio.create_task(queue.run(Task(input="3"), capability="work", timeout=20))

    waiting = await wait_for_metrics(nc, settings, lambda m: m.queue_length == 1)

    assert waiting.active_jobs == 2
    assert sorted(t for _, t in started) == ["1", "2"]  # the third went to nobody
    freed = next(name for name, text in started if text == "1")
    gates[freed].set()
    result = await asyncio.wait_for(third, 10)
    assert result.agent == freed  # it went to the instance that freed up
    gates["a"].set()
    gates["b"].set()
    await asyncio.gather(first, second)


async def test_failing_instance_is_taken_out_of_rotation_and_comes_back(
    start_coordinator: StartCoordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    await start_coordinator(max_attempts=20, breaker_failures=3, breaker_cooldown=0.3)
    broken = True
    attempts_while_broken = 0
    agent = worker("patchy", max_concurrency=4)

    @agent.on_task
    async def patchy(task: Task, ctx: Context) -> str:
        nonlocal attempts_while_broken
        if broken:
            attempts_while_broken += 1
            raise RuntimeError("dependency down")
        return "ok"

    await start_host(agent)
    queue = TaskQueue(nc, settings.subjects)
    runs = [
        asyncio.create_task(queue.run(Task(input=str(i)), capability="work", timeout=30))
        for i in range(10)
    ]

    await wait_for_metrics(nc, settings, lambda m: any(a.breaker == "open" for a in m.agents))
    failures_when_opened = attempts_while_broken
    broken = False
    results = await asyncio.gather(*runs)

    assert failures_when_opened <= 4 + 3  # the breaker opened: the queue was not drained
    assert attempts_while_broken <= failures_when_opened + 1  # at most one trial after that
    assert len({r.task_id for r in results}) == 10
    final = await metrics(nc, settings)
    assert final.completed_tasks == 10
    assert final.agents[0].breaker == "closed"


async def test_a_poison_task_is_dead_lettered_with_every_attempts_error(
    coordinator: Coordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    agent = worker("picky")

    @agent.on_task
    async def picky(task: Task, ctx: Context) -> str:
        raise ValueError(f"cannot digest {task.input!r}")

    await start_host(agent)
    js = nc.jetstream()
    await ensure_dead_letter_stream(js, settings.subjects)
    letters = await js.subscribe(settings.subjects.all_dead_letters, ordered_consumer=True)
    queue = TaskQueue(nc, settings.subjects)

    with pytest.raises(TaskFailed) as caught:
        await queue.run(Task(input="poison"), capability="work", timeout=20)

    assert "after 3 attempts" in caught.value.reason
    letter = decode((await letters.next_msg(timeout=5)).data, DeadLetter)
    assert letter.task.input == "poison"
    assert letter.target == "cap.work"
    assert [e.attempt for e in letter.errors] == [1, 2, 3]
    assert all("cannot digest 'poison'" in e.reason for e in letter.errors)
    assert (await metrics(nc, settings)).dead_lettered == 1


async def test_more_tasks_than_capacity_wait_and_start_in_submission_order(
    coordinator: Coordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    order: list[int] = []
    running = 0
    peak = 0
    agent = worker("ordered", max_concurrency=2)

    @agent.on_task
    async def record(task: Task, ctx: Context) -> str:
        nonlocal running, peak
        order.append(int(task.input))
        running += 1
        peak = max(peak, running)
        await ctx.ask_model(task.input)
        running -= 1
        return "ok"

    await start_host(agent, model=OfflineModel(delay=0.01))
    queue = TaskQueue(nc, settings.subjects)
    tasks = [Task(input=str(i)) for i in range(25)]
    for task in tasks:
        await queue.submit(task, capability="work")

    outcomes = [await queue.wait(t.task_id, timeout=20) for t in tasks]

    assert all(o.status == "completed" for o in outcomes)
    assert order == list(range(25))
    assert peak == 2


async def test_resubmitting_a_task_id_runs_it_once(
    coordinator: Coordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    calls = 0
    agent = worker("once")

    @agent.on_task
    async def count(task: Task, ctx: Context) -> str:
        nonlocal calls
        calls += 1
        return "ok"

    await start_host(agent)
    queue = TaskQueue(nc, settings.subjects)
    task = Task(input="x", task_id="order-42")

    first = await queue.run(task, capability="work", timeout=10)
    again = await queue.run(task, capability="work", timeout=10)

    assert first == again
    assert calls == 1


async def test_metrics_report_agents_load_and_totals(
    coordinator: Coordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    host = await start_host(worker(max_concurrency=5))
    queue = TaskQueue(nc, settings.subjects)
    for i in range(3):
        await queue.run(Task(input=str(i)), capability="work", timeout=10)

    current = await metrics(nc, settings)

    assert (current.total_agents, current.healthy_agents) == (1, 1)
    assert (current.total_tasks, current.completed_tasks, current.queue_length) == (3, 3, 0)
    assert current.agents[0].instance == host.instance
    assert current.agents[0].max_concurrency == 5
    assert current.agents[0].success_rate == 1.0


async def test_a_malformed_queued_task_is_dead_lettered_and_dispatch_goes_on(
    coordinator: Coordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    await start_host(worker())
    queue = TaskQueue(nc, settings.subjects)
    await queue.run(Task(input="warm-up"), capability="work", timeout=10)
    js = nc.jetstream()
    letters = await js.subscribe(settings.subjects.all_dead_letters, ordered_consumer=True)

    await js.publish(
        settings.subjects.dispatch("cap.work"), b'{"input": 42}', headers={"Nats-Msg-Id": "bad-1"}
    )
    letter = decode((await letters.next_msg(timeout=10)).data, DeadLetter)
    after = await queue.run(Task(input="still serving"), capability="work", timeout=10)

    assert letter.errors[0].code == "invalid_message"
    assert "$.input" in letter.errors[0].reason
    assert after.output.endswith("still serving")


async def test_agent_up_and_left_notices_are_published(
    coordinator: Coordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    notices: asyncio.Queue[AgentStatusChange] = asyncio.Queue()

    async def on_notice(msg: Msg) -> None:
        await notices.put(decode(msg.data, AgentStatusChange))

    await nc.subscribe(settings.subjects.all_status, cb=on_notice)
    host = await start_host(worker())
    up = await asyncio.wait_for(notices.get(), 10)
    await host.stop(timeout=5)
    left = await asyncio.wait_for(notices.get(), 10)

    assert (up.instance, up.health) == (host.instance, "up")
    assert (left.instance, left.health, left.previous) == (host.instance, "left", "healthy")
