"""Workflows: pipeline, parallel, event-driven, hierarchical and business-process runs.

Define a workflow in YAML (`load_workflow`) or in Python with the same structs:

    from chorus.workflows import Pipeline, Step
    report = Pipeline(name="report", steps=[Step(agent="researcher"), Step(capability="writing")])

Run it with the engine (`chorus.workflows.engine`: `run_workflow`, `Engine`, `new_record`),
follow it with `chorus.workflows.progress.ProgressWatch`.

This package's top level holds only the definitions: `chorus.messages` imports them, so
nothing imported here may import `chorus.messages`.
"""

from chorus.specs.workflow import (
    EventDriven,
    Hierarchical,
    Parallel,
    ParallelTask,
    Pipeline,
    Process,
    ProcessStep,
    Step,
    Target,
    WorkflowSpec,
    decode_workflow,
    load_workflow,
)

__all__ = [
    "EventDriven",
    "Hierarchical",
    "Parallel",
    "ParallelTask",
    "Pipeline",
    "Process",
    "ProcessStep",
    "Step",
    "Target",
    "WorkflowSpec",
    "decode_workflow",
    "load_workflow",
]
