"""Pipeline: steps one after another, each step's output the next step's input."""

from __future__ import annotations

from typing import Any

from chorus.errors import RunFailed
from chorus.messages import Result, StepRecord
from chorus.specs.expressions import as_text
from chorus.specs.templates import Template
from chorus.specs.workflow import Pipeline, Step
from chorus.workflows import human
from chorus.workflows.processors import call_processor, resolve_processor
from chorus.workflows.run import Finish, Run, StepFailed


async def execute(run: Run, spec: Pipeline) -> None:
    finishers = {step.key: _finisher(run, step) for step in spec.steps}
    text, data = run.record.input, run.record.data
    for number, step in enumerate(spec.steps, 1):
        done = run.done(step.key)
        if done is None:
            task_input = (
                await Template(step.input).render_async(run.context()) if step.input else text
            )
            try:
                done = (
                    await human.ask(run, step)
                    if step.human
                    else await run.perform(
                        step.key, step, task_input, data=data, finish=finishers[step.key]
                    )
                )
            except StepFailed as failure:
                raise RunFailed(
                    f"step {number} ({step.target}) failed: {failure.step.error}"
                ) from None
        if done.succeeded:  # a step skipped (the budget is spent) passes nothing on
            text, data = done.output, done.data
    run.record.output, run.record.output_data = text, data


def _finisher(run: Run, step: Step) -> Finish | None:
    """The step's output processor as a finish hook (resolved before anything runs)."""
    if step.output:
        template = Template(step.output)

        async def apply_template(record: StepRecord, result: Result) -> None:
            context = run.context()
            context["output"] = result.output
            context["result"] = _result_view(result)
            record.output = await template.render_async(context)

        return apply_template
    if step.processor:
        processor = resolve_processor(step.processor, run.services.processors)

        async def apply_processor(record: StepRecord, result: Result) -> None:
            record.output = as_text(await call_processor(step.processor, processor, record))

        return apply_processor
    return None


def _result_view(result: Result) -> dict[str, Any]:
    return {
        "output": result.output,
        "data": result.data,
        "agent": result.agent,
        "instance": result.instance,
    }
