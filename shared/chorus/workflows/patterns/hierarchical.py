"""Hierarchical: a supervisor plans, workers carry out subtasks, the supervisor compiles.

1. The supervisor is asked for a DelegationPlan as structured output; the plan is parsed and
   checked (schema, ids, dependencies, cycles) and kept in the run record.
2. Every capability the plan needs is checked against the running agents before any subtask
   is sent, so a missing worker fails the run at once, naming the capability.
3. Subtasks run in parallel as far as `depends_on` allows (at most `max_concurrency` at once);
   a subtask gets the results of the subtasks it depends on.
4. The supervisor gets every subtask's result as typed data (PlanResults) and writes the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import msgspec

from chorus.errors import RunFailed
from chorus.messages import PlanResults, Result, StepRecord, Subtask, SubtaskResult
from chorus.specs.workflow import Hierarchical, Target
from chorus.workflows.plan import PLAN_SCHEMA, check_plan, choose_workers, parse_plan
from chorus.workflows.run import Run, StepFailed, together

PLANNING = (
    "Split the goal into subtasks for worker agents. Give each subtask a short id (letters, "
    "digits, '-' or '_'), a description a worker can act on by itself, the capabilities it "
    "needs, and in depends_on the ids of the subtasks whose results it needs first. Use at "
    "most {max_subtasks} subtasks."
)
COMPILING = (
    "Compile the final answer to the goal from the results of the subtasks. Say which "
    "results support each part of the answer."
)


def subtask_step(subtask_id: str) -> str:
    return f"subtask-{subtask_id}"


async def execute(run: Run, spec: Hierarchical) -> None:
    record = run.record
    directory = run.services.directory
    agents = await directory.agents() if directory is not None else None
    supervisor = Target(agent=spec.supervisor, timeout=spec.timeout, retries=spec.retries)
    if record.plan is None or run.done("plan") is None:
        await _plan(run, spec, supervisor, agents)
    plan = record.plan
    assert plan is not None
    # Checked before any subtask is sent: a missing worker fails the run now, not midway.
    workers = choose_workers(plan, agents)
    for subtask in plan.subtasks:
        run.step(subtask_step(subtask.id))
    finished = {s.id: asyncio.Event() for s in plan.subtasks}
    limit = asyncio.Semaphore(spec.max_concurrency)

    async def one(subtask: Subtask) -> None:
        name = subtask_step(subtask.id)
        try:
            for dependency in subtask.depends_on:
                await finished[dependency].wait()
            if run.done(name) is not None:
                return
            failed = [d for d in subtask.depends_on if not _step(run, d).succeeded]
            if failed:
                await run.skip(name, f"not run: {', '.join(failed)} did not succeed")
                return
            target = msgspec.structs.replace(
                workers[subtask.id], timeout=spec.timeout, retries=spec.retries
            )
            inputs = [_result(run, d, plan.subtasks) for d in subtask.depends_on]
            async with limit:
                with contextlib.suppress(StepFailed):  # recorded in the step
                    await run.perform(
                        name,
                        target,
                        _subtask_input(subtask, record.input, inputs),
                        data=PlanResults(goal=record.input, results=inputs),
                    )
        finally:
            finished[subtask.id].set()

    await together(one(s) for s in plan.subtasks)
    for subtask in plan.subtasks:
        step = _step(run, subtask.id)
        if step.status == "failed":
            raise RunFailed(
                f"subtask {subtask.id} ({', '.join(subtask.capabilities)}) failed: {step.error}"
            )
    if any(not _step(run, s.id).succeeded for s in plan.subtasks):
        raise RunFailed("some subtasks did not run; see the run record")
    results = [_result(run, s.id, plan.subtasks) for s in plan.subtasks]
    compiled = run.done("compile")
    if compiled is None:
        try:
            compiled = await run.perform(
                "compile",
                supervisor,
                _compile_input(record.input, results),
                instructions=spec.compile_instructions or COMPILING,
                data=PlanResults(goal=record.input, results=results),
            )
        except StepFailed as failure:
            raise RunFailed(
                f"the supervisor {spec.supervisor} could not compile the answer: "
                f"{failure.step.error}"
            ) from None
    record.output, record.output_data = compiled.output, compiled.data


async def _plan(
    run: Run, spec: Hierarchical, supervisor: Target, agents: Mapping[str, frozenset[str]] | None
) -> None:
    instructions = PLANNING.format(max_subtasks=spec.max_subtasks)
    if agents is not None:
        offered = sorted(frozenset().union(*agents.values())) if agents else []
        instructions += f" Workers offer these capabilities: {', '.join(offered) or 'none'}."
    if spec.instructions:
        instructions += "\n\n" + spec.instructions

    async def accept(step: StepRecord, result: Result) -> None:
        plan = parse_plan(result)
        check_plan(plan, spec.max_subtasks)
        run.record.plan = plan
        step.data = msgspec.to_builtins(plan)

    try:
        await run.perform(
            "plan",
            supervisor,
            run.record.input,
            instructions=instructions,
            json_schema=PLAN_SCHEMA,
            finish=accept,
        )
    except StepFailed as failure:
        raise RunFailed(
            f"the supervisor {spec.supervisor} gave no usable plan: {failure.step.error}"
        ) from None
    plan = run.record.plan
    assert plan is not None
    await run.report("plan_ready", "plan", ", ".join(s.id for s in plan.subtasks))


def _step(run: Run, subtask_id: str) -> StepRecord:
    return run.step(subtask_step(subtask_id))


def _result(run: Run, subtask_id: str, subtasks: list[Subtask]) -> SubtaskResult:
    step = _step(run, subtask_id)
    subtask = next(s for s in subtasks if s.id == subtask_id)
    return SubtaskResult(
        id=subtask_id,
        description=subtask.description,
        agent=step.agent,
        output=step.output,
        data=step.data,
    )


def _subtask_input(subtask: Subtask, goal: str, inputs: list[SubtaskResult]) -> str:
    parts = [subtask.description, f"The overall goal: {goal}"]
    if inputs:
        parts.append("Results you can build on:")
        parts.extend(f"[{r.id}] {r.output}" for r in inputs)
    return "\n\n".join(parts)


def _compile_input(goal: str, results: list[SubtaskResult]) -> str:
    parts = [f"Goal: {goal}", "Results of the subtasks:"]
    parts.extend(f"[{r.id}] {r.description} (by {r.agent}):\n{r.output}" for r in results)
    return "\n\n".join(parts)
