"""Business process: named steps with conditions, really evaluated on earlier results.

Before a step runs, `when` is evaluated: false skips the step. Then `require`: false fails the
process at that step, which is recorded as failed with the condition. A condition that cannot
be evaluated (a missing key, a type mismatch) fails the process naming the step and the
expression. The process status lives in the run record in KV.
"""

from __future__ import annotations

from chorus.errors import ExpressionError, RunFailed
from chorus.messages import StepRecord
from chorus.specs.expressions import parse
from chorus.specs.templates import Template
from chorus.specs.workflow import Process, ProcessStep
from chorus.workflows import human
from chorus.workflows.run import Run, StepFailed


async def execute(run: Run, spec: Process) -> None:
    record = run.record
    last: StepRecord | None = None
    for step in spec.steps:
        done = run.done(step.name) or await _step(run, step)
        if done.succeeded:
            last = done
    if spec.output:
        try:
            record.output = await Template(spec.output).render_async(run.context())
        except ExpressionError as exc:
            raise RunFailed(f"output: {exc.reason}") from None
    elif last is not None:
        record.output, record.output_data = last.output, last.data


async def _step(run: Run, step: ProcessStep) -> StepRecord:
    context = run.context()
    try:
        if step.when and not await parse(step.when).is_true_async(context):
            await run.skip(step.name, f"`{step.when}` is false")
            return run.step(step.name)
        if step.require and not await parse(step.require).is_true_async(context):
            reason = f"requirement `{step.require}` is not met"
            await run.fail(step.name, reason)
            raise RunFailed(f"step {step.name}: {reason}")
        task_input = (
            await Template(step.input).render_async(context) if step.input else run.record.input
        )
    except ExpressionError as exc:
        await run.fail(step.name, exc.reason)
        raise RunFailed(f"step {step.name}: {exc.reason}") from None
    try:
        if step.human:
            return await human.ask(run, step)
        return await run.perform(step.name, step, task_input, data=run.record.data)
    except StepFailed as failure:
        raise RunFailed(f"step {step.name} ({step.target}) failed: {failure.step.error}") from None
