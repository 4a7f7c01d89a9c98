"""Runs and steps as spans: `invoke_workflow <workflow>` per run (with the run's token total),
a `step <name>` span per attempt of a step, each retry linked to the attempt before it.

A run's span is a child of the span current where the run was started (an orchestrator's
`process` span of the run request, whose parent is the submitter's), else of the trace the
run record names (`traceparent` on its head), so a run resumed anywhere stays in one trace.
A record without one is given the context it starts in, and keeps it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Coroutine, Iterator
from typing import Any

from opentelemetry.trace import Link, Span

from chorus.messages import RunRecord, Task
from chorus.nats import propagation
from chorus.telemetry import tracing


async def traced_run(work: Coroutine[Any, Any, RunRecord], record: RunRecord) -> RunRecord:
    """Await `work` (the engine driving `record`) inside the run's span."""
    here = propagation.current_traceparent()
    parent = None if here else propagation.from_traceparent(record.traceparent)
    attributes: tracing.Attributes = {
        tracing.GEN_AI_OPERATION: "invoke_workflow",
        tracing.GEN_AI_WORKFLOW_NAME: record.workflow.name,
        tracing.RUN_ID: record.run_id,
        tracing.RESUMED: record.started_at > 0,
    }
    try:
        with tracing.span(
            f"invoke_workflow {record.workflow.name}", parent=parent, attributes=attributes
        ) as span:
            if not record.traceparent:
                record.traceparent = here or propagation.current_traceparent()
            try:
                return await work
            finally:
                _finished(span, record)
    finally:
        work.close()  # a no-op once it ran; silences "never awaited" if cancelled first


def _finished(span: Span, record: RunRecord) -> None:
    tracing.record_usage(span, record.usage)  # the run's token total
    span.set_attribute("chorus.run.status", record.status)
    if record.status == "failed":
        tracing.mark_failed("run_failed", record.error, span)


class StepSpans:
    """The spans of a run's step attempts; each new attempt of a step links to the last."""

    def __init__(self, workflow: str) -> None:
        self.workflow = workflow
        self._last: dict[str, Link] = {}

    @contextlib.contextmanager
    def attempt(self, task: Task) -> Iterator[Span]:
        step = task.step or task.task_id
        links = [self._last[step]] if step in self._last else []
        attributes: tracing.Attributes = {
            tracing.STEP: step,
            tracing.ATTEMPT: task.attempt,
            tracing.TASK_ID: task.task_id,
            tracing.RUN_ID: task.run_id,
            tracing.GEN_AI_WORKFLOW_NAME: self.workflow,
        }
        if task.agent:
            attributes[tracing.GEN_AI_AGENT_NAME] = task.agent
        with tracing.span(f"step {step}", attributes=attributes, links=links) as span:
            self._last[step] = Link(span.get_span_context(), {tracing.ATTEMPT: task.attempt})
            yield span
