"""Coordinator behaviours that are about processes dying: real `chorus` subprocesses."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.client.durable import TaskQueue
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.messages import Heartbeat, Task, decode
from chorus.nats.streams import ensure_tasks_bucket
from tests.coordination import wait_for_record
from tests.helpers import Reap, SpawnAgent, child_env, first_busy_instance, stop_child, write_spec

SLOW = """
name: slow
capabilities: [slow]
max_concurrency: 2
handler: tests.agents.handlers:take_time
"""


async def test_killed_agent_task_completes_elsewhere_and_is_recorded_once(
    coordinator: Coordinator,
    spawn_agent: SpawnAgent,
    nc: Client,
    settings: Settings,
    tmp_path: Path,
) -> None:
    spec = write_spec(tmp_path, "slow", SLOW)
    agents = {a.instance: a for a in [await spawn_agent(spec), await spawn_agent(spec)]}
    busy = await first_busy_instance(nc, settings)
    queue = TaskQueue(nc, settings.subjects)
    task = Task(input="survive", data=1.0)
    run = asyncio.create_task(queue.run(task, capability="slow", timeout=30))
    victim = await asyncio.wait_for(busy, 10)

    agents[victim].signal(signal.SIGKILL)
    result = await run

    assert result.instance != victim
    assert result.output == "done: survive"
    tasks = await ensure_tasks_bucket(nc.jetstream(), settings.subjects)
    assert len(await tasks.history(f"outcome.{task.task_id}")) == 1
    outcome = await queue.outcome(task.task_id)
    assert outcome is not None and outcome.attempts == 2
    assert outcome.errors[0].code == "instance_lost" and outcome.errors[0].instance == victim
    dead_within = settings.heartbeat_interval * (5 + 3)
    record = await wait_for_record(
        nc, settings, victim, lambda r: r is None or r.health == "dead", timeout=dead_within
    )
    assert record is None or record.health == "dead"


def start_coordinator_process(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = child_env(settings)
    env.update({"CHORUS_CLAIM_TIMEOUT": "2", "CHORUS_RETRY_BACKOFF": "0.05"})
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "chorus", "coordinator"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


async def test_coordinator_restart_mid_load_loses_no_task(
    spawn_agent: SpawnAgent, nc: Client, settings: Settings, tmp_path: Path, reap: Reap
) -> None:
    spec = write_spec(tmp_path, "slow", SLOW)
    await spawn_agent(spec)
    await spawn_agent(spec)
    log = tmp_path / "coordinator.log"
    first = reap(start_coordinator_process(settings, log))
    queue = TaskQueue(nc, settings.subjects)
    tasks = [Task(input=str(i), data=0.05) for i in range(40)]
    for task in tasks:
        await queue.submit(task, capability="slow")
    await queue.wait(tasks[5].task_id, timeout=20)  # under way

    first.kill()
    first.wait(10)
    second = reap(start_coordinator_process(settings, log))
    outcomes = [await queue.wait(t.task_id, timeout=30) for t in tasks]
    assert stop_child(second) == 0, log.read_text()

    assert [o.status for o in outcomes] == ["completed"] * 40
    assert [o.result.output for o in outcomes if o.result] == [f"done: {i}" for i in range(40)]


async def test_sigterm_drains_the_agent_and_it_leaves_the_registry(
    coordinator: Coordinator,
    spawn_agent: SpawnAgent,
    nc: Client,
    settings: Settings,
    tmp_path: Path,
) -> None:
    agent = await spawn_agent(write_spec(tmp_path, "slow", SLOW))
    await wait_for_record(nc, settings, agent.instance, lambda r: r is not None)
    busy = asyncio.Event()

    async def on_beat(msg: Msg) -> None:
        if decode(msg.data, Heartbeat).in_flight:
            busy.set()

    await nc.subscribe(settings.subjects.heartbeat(agent.instance), cb=on_beat)
    queue = TaskQueue(nc, settings.subjects)
    task = Task(input="finish me", data=1.0)
    run = asyncio.create_task(queue.run(task, capability="slow", timeout=30))
    await asyncio.wait_for(busy.wait(), 10)

    agent.signal(signal.SIGTERM)
    result = await run
    gone = await wait_for_record(nc, settings, agent.instance, lambda r: r is None, timeout=10)

    assert result.output == "done: finish me"
    assert gone is None
    assert await asyncio.to_thread(agent.wait, 15) == 0
