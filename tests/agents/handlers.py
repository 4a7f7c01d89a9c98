"""Python-defined agents that the multi-process tests run with `chorus agent run`."""

from __future__ import annotations

import asyncio

from chorus.agent import Agent, Context
from chorus.messages import Task

slow = Agent(name="slow", capabilities=["slow"], max_concurrency=2)


@slow.on_task
async def take_time(task: Task, ctx: Context) -> str:
    """Simulated work of `task.data` seconds (a model call that takes a while)."""
    await asyncio.sleep(float(task.data or 1.0))
    return f"done: {task.input}"
