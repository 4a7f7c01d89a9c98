"""The handler of the agent process `bench.streaming` measures (`handler: ...:timed`).

It streams the offline model's deltas into the task's live output as the agent loop does
(`chorus.llm.base.streamed_reply` handing each delta to the task's stream) and returns, as
the task's data, when it started the model and when the first delta came (CLOCK_MONOTONIC
nanoseconds: comparable with the bench process's on one machine). `mode` in the task's data
picks what it does: `stream` (the default), `complete` (the same model call, not streamed)
or `burst` (BURST tool-call chunks at once, which batching never holds back).
"""

from __future__ import annotations

import time
from typing import Any

from chorus.agent import Agent, Context, Reply
from chorus.llm import ModelRequest, TextDelta
from chorus.llm.base import FunctionCall
from chorus.messages import Task

BURST = 50

agent = Agent(name="bencher", capabilities=["stream"], max_concurrency=4)


@agent.on_task
async def timed(task: Task, ctx: Context) -> Reply:
    assert ctx.stream is not None
    mode = (task.data or {}).get("mode", "stream")
    request = ModelRequest(model="offline", instructions=ctx.instructions, input=task.input)
    started = time.monotonic_ns()
    data: dict[str, Any] = {"started": started}
    if mode == "complete":
        reply = await ctx.model.complete(request)
        return Reply(output=reply.text, data=data)
    if mode == "burst":
        for n in range(BURST):
            ctx.stream.tool_started(FunctionCall(call_id=f"c{n}", name="tick"))
        return Reply(output="burst", data=data)
    text = ""
    async for event in ctx.model.stream(request):
        if isinstance(event, TextDelta):
            data.setdefault("first", time.monotonic_ns())
            ctx.stream.delta(event.text)
        else:
            text = event.text
    return Reply(output=text, data=data)
