"""Pipeline: steps one after another, each step's output the next step's input."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from chorus.errors import ChorusError, RunFailed, TaskFailed
from chorus.messages import Result, StepRecord
from chorus.specs.expressions import as_text
from chorus.specs.templates import Template
from chorus.specs.workflow import Pipeline, Step
from chorus.workflows.run import Finish, Processor, Run, StepFailed


async def execute(run: Run, spec: Pipeline) -> None:
    finishers = {step.key: _finisher(run, step) for step in spec.steps}
    text, data = run.record.input, run.record.data
    for number, step in enumerate(spec.steps, 1):
        done = run.done(step.key)
        if done is None:
            task_input = Template(step.input).render(run.context()) if step.input else text
            try:
                done = await run.perform(
                    step.key, step, task_input, data=data, finish=finishers[step.key]
                )
            except StepFailed as failure:
                raise RunFailed(
                    f"step {number} ({step.target}) failed: {failure.step.error}"
                ) from None
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
            record.output = template.render(context)

        return apply_template
    if step.processor:
        processor = resolve_processor(step.processor, run.services.processors)

        async def apply_processor(record: StepRecord, result: Result) -> None:
            try:
                value: Any = processor(record)
                if inspect.isawaitable(value):
                    value = await value
            except ChorusError:
                raise
            except Exception as exc:
                raise TaskFailed(
                    f"output processor {step.processor} raised {type(exc).__name__}: {exc}"
                ) from exc
            record.output = as_text(value)

        return apply_processor
    return None


def _result_view(result: Result) -> dict[str, Any]:
    return {
        "output": result.output,
        "data": result.data,
        "agent": result.agent,
        "instance": result.instance,
    }


def resolve_processor(name: str, registered: Mapping[str, Processor]) -> Processor:
    """A processor given to the engine by name, or a `package.module:function` to import."""
    if name in registered:
        return registered[name]
    module_name, _, attribute = name.partition(":")
    if not attribute:
        raise RunFailed(
            f"output processor {name!r} is not registered with the engine and is not a "
            "package.module:function reference"
        )
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise RunFailed(f"cannot load output processor {name!r}: {exc}") from None
    if not callable(found):
        raise RunFailed(f"output processor {name!r} is not a function")
    return found  # type: ignore[no-any-return]
