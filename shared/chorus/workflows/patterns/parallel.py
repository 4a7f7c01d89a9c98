"""Parallel: every task at once under a concurrency limit; failures stay per task."""

from __future__ import annotations

import asyncio
import contextlib

from chorus.errors import RunFailed
from chorus.specs.templates import Template
from chorus.specs.workflow import Parallel, ParallelTask
from chorus.workflows.run import Run, StepFailed, together


async def execute(run: Run, spec: Parallel) -> None:
    for task in spec.tasks:  # the record lists tasks in the workflow's order
        run.step(task.key)
    limit = asyncio.Semaphore(spec.max_concurrency)

    async def one(task: ParallelTask) -> None:
        step = run.find(task.key)
        if step is not None and step.status in ("completed", "failed"):
            return  # finished before a resume, one way or the other
        task_input = (
            await Template(task.input).render_async(run.context())
            if task.input
            else run.record.input
        )
        # A failure is recorded in the task's step; the others carry on.
        async with limit:
            with contextlib.suppress(StepFailed):
                await run.perform(task.key, task, task_input, data=run.record.data)

    await together(one(task) for task in spec.tasks)

    steps = [run.step(task.key) for task in spec.tasks]
    succeeded = [s for s in steps if s.succeeded]
    run.record.output = "\n\n".join(f"## {s.name}\n{s.output}" for s in succeeded)
    run.record.output_data = {s.name: s.data for s in succeeded if s.data is not None} or None
    if len(succeeded) < spec.min_success:
        failures = "; ".join(
            f"task {s.name} ({task.target}) failed: {s.error}"
            for s, task in zip(steps, spec.tasks, strict=True)
            if not s.succeeded
        )
        raise RunFailed(
            f"{len(succeeded)} of {len(steps)} tasks succeeded and {spec.min_success} "
            f"must: {failures}"
        )
