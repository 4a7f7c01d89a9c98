"""An example supervisor for hierarchical workflows that plans without a language model.

With a real model (`model: openai:...`) a supervisor needs no code: the default handler asks
the model for the plan as structured output. The offline model can only return a schema
sample, so the demo's supervisor plans by rule: two research subtasks that can run in
parallel, then an analysis that needs both. When asked to compile (no schema), it answers
with its model from the subtask results.
"""

from __future__ import annotations

import msgspec

from chorus.agent import Agent, Context, Reply
from chorus.messages import DelegationPlan, PlanResults, Subtask, Task

planner = Agent(name="planner", capabilities=["planning"], max_concurrency=4)


@planner.on_task
async def plan_or_compile(task: Task, ctx: Context) -> Reply | DelegationPlan:
    if task.json_schema is not None:
        return DelegationPlan(
            subtasks=[
                Subtask(
                    id="facts",
                    description=f"Find the key facts about: {task.input}",
                    capabilities=["research"],
                    depends_on=[],
                ),
                Subtask(
                    id="risks",
                    description=f"Find the known limits and risks of: {task.input}",
                    capabilities=["research"],
                    depends_on=[],
                ),
                Subtask(
                    id="weigh",
                    description="Weigh the facts against the risks and conclude.",
                    capabilities=["analysis"],
                    depends_on=["facts", "risks"],
                ),
            ]
        )
    compiled = msgspec.convert(task.data, PlanResults)  # the subtask results, typed
    summary = "; ".join(f"{r.id} ({r.agent}): {r.output}" for r in compiled.results)
    reply = await ctx.ask_model(f"Goal: {compiled.goal}. Results: {summary}")
    return Reply(output=reply.text, data={"compiled_from": [r.id for r in compiled.results]})
