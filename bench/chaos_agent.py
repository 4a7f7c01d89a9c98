"""The handler of the agent processes `bench.chaos` starts and kills (`handler: ...:work`).

A task's `data` says what it is: `{"seconds": S}` simulated work of S seconds (a model call
that takes a while), `{"poison": true}` a task that fails on every attempt, so the
coordinator must dead-letter it, once. A workflow step (its data is the run's) works
DEFAULT_SECONDS.
"""

from __future__ import annotations

import asyncio

from chorus.agent import Agent, Context
from chorus.errors import TaskFailed
from chorus.messages import Task

CAPABILITY = "chaos"
DEFAULT_SECONDS = 0.5

agent = Agent(name="bencher", capabilities=[CAPABILITY], max_concurrency=4)


@agent.on_task
async def work(task: Task, ctx: Context) -> str:
    data = task.data if isinstance(task.data, dict) else {}
    if data.get("poison"):
        raise TaskFailed(f"poison task {task.task_id}: fails on every attempt")
    await asyncio.sleep(float(data.get("seconds", DEFAULT_SECONDS)))
    return f"done: {task.input}"
