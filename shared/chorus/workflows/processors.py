"""Output processors: Python functions that pipeline steps name, from a registry given at start.

A workflow arrives off the wire (`POST /api/execute`, a RunRequest), so a step's `processor:`
is only ever a name looked up in the registry the engine was started with; nothing named in a
workflow is imported. The registry is a mapping given to `Engine(processors=...)` or
`run_workflow(..., processors=...)`, or, for the orchestrator service, modules named on its
command line, each exposing a `PROCESSORS` mapping:

    # mycompany/processors.py
    PROCESSORS = {"first_word": lambda step: step.output.split()[0]}

    chorus orchestrator --processors mycompany.processors   # repeatable

A processor runs inside the orchestrator, so whatever it raises, `SystemExit` and
`KeyboardInterrupt` included, fails its step instead of ending the service.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from chorus.errors import ChorusError, ConfigError, TaskFailed
from chorus.messages import StepRecord
from chorus.specs.workflow import Pipeline, WorkflowSpec
from chorus.workflows.run import Processor

REGISTRY_ATTRIBUTE = "PROCESSORS"


def load_processors(modules: Iterable[str]) -> dict[str, Processor]:
    """The processors of the given modules (operator configuration, never a workflow), merged.

    Raises ConfigError when a module cannot be imported, has no `PROCESSORS` mapping of names
    to callables, or registers a name another module already did.
    """
    found: dict[str, Processor] = {}
    owners: dict[str, str] = {}
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"cannot import processor module {module_name!r}: {exc}") from None
        registry = getattr(module, REGISTRY_ATTRIBUTE, None)
        if not isinstance(registry, Mapping):
            raise ConfigError(
                f"processor module {module_name!r} has no {REGISTRY_ATTRIBUTE} mapping "
                "(define PROCESSORS = {'name': function, ...})"
            )
        for name, processor in registry.items():
            if not isinstance(name, str) or not callable(processor):
                raise ConfigError(
                    f"{module_name}.{REGISTRY_ATTRIBUTE} must map names to functions; "
                    f"{name!r} maps to {type(processor).__name__}"
                )
            if name in owners:
                raise ConfigError(
                    f"processor {name!r} is registered by both {owners[name]} and {module_name}"
                )
            found[name], owners[name] = processor, module_name
    return found


def check_processors(workflow: WorkflowSpec, registered: Mapping[str, Processor]) -> None:
    """Refuse a workflow naming a processor the registry lacks, before any step runs."""
    if not isinstance(workflow, Pipeline):
        return
    for number, step in enumerate(workflow.steps, 1):
        if step.processor and step.processor not in registered:
            raise ConfigError(
                f"spec error, the run was refused before any step ran: step {number} "
                f"({step.key}) names the output processor {step.processor!r}, which is not "
                f"registered with this orchestrator (registered: {_names(registered)}). "
                "Processors are never imported from a workflow; register them with "
                "`chorus orchestrator --processors MODULE` or Engine(processors=...)"
            )


def resolve_processor(name: str, registered: Mapping[str, Processor]) -> Processor:
    """The registered processor called `name`; ConfigError naming the registered ones if none."""
    if name not in registered:
        raise ConfigError(
            f"output processor {name!r} is not registered with the engine "
            f"(registered: {_names(registered)})"
        )
    return registered[name]


async def call_processor(name: str, processor: Processor, step: StepRecord) -> Any:
    """The processor's value for the finished step. Anything it raises but a cancellation or
    a ChorusError (which keep their meaning) becomes TaskFailed naming the processor."""
    try:
        value: Any = processor(step)
        if inspect.isawaitable(value):
            value = await value
    except (ChorusError, asyncio.CancelledError):
        raise
    except BaseException as exc:  # SystemExit or KeyboardInterrupt too: never end the service
        raise TaskFailed(f"output processor {name!r} raised {type(exc).__name__}: {exc}") from exc
    return value


def _names(registered: Mapping[str, Processor]) -> str:
    return ", ".join(sorted(registered)) or "none"
