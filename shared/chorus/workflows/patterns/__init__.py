"""The five patterns. Each `execute(run, spec)` advances a run to its end, skipping steps the
record says are done, and sets the run's output; it raises RunFailed when the run fails."""

from __future__ import annotations

from chorus.specs.workflow import EventDriven, Hierarchical, Parallel, Pipeline, Process
from chorus.workflows.patterns import event, hierarchical, parallel, pipeline, process
from chorus.workflows.run import Run


async def execute(run: Run) -> None:
    spec = run.record.workflow
    if isinstance(spec, Pipeline):
        await pipeline.execute(run, spec)
    elif isinstance(spec, Parallel):
        await parallel.execute(run, spec)
    elif isinstance(spec, EventDriven):
        await event.execute(run, spec)
    elif isinstance(spec, Hierarchical):
        await hierarchical.execute(run, spec)
    elif isinstance(spec, Process):
        await process.execute(run, spec)
    else:  # pragma: no cover - the union is closed
        raise TypeError(f"unknown workflow {type(spec).__name__}")
