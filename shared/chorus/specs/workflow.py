"""Workflow definitions: one msgspec Struct per pattern, the same in YAML, JSON and Python.

    type: pipeline                 # pipeline | parallel | event | hierarchical | process
    name: research-report
    steps:
      - agent: researcher
        instructions: Find the key facts.
      - capability: writing
        output: "Summary: {{ output }}"

Every struct refuses unknown fields and checks itself when built (from a file, from a
`RunRequest`, or in Python), so a wrong workflow is reported, with the field and the line,
before anything runs. Conditions and templates use `chorus.specs.expressions`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Literal, cast

import msgspec
import yaml

from chorus.errors import ConfigError, ExpressionError, InvalidWorkflow, NotFound
from chorus.specs.answers import check_answer_schema
from chorus.specs.budget import RunBudget
from chorus.specs.expressions import Expression, parse
from chorus.specs.loading import decode_yaml
from chorus.specs.templates import Template
from chorus.subjects import check_token, check_topic

WorkflowKind = Literal["pipeline", "parallel", "event", "hierarchical", "process"]
StepType = Literal["agent", "human"]
TimeoutAction = Literal["reject", "approve", "fail"]

# The names conditions and templates can read (see `chorus.workflows.run.Run.context`).
RUN_NAMES: Final = frozenset({"input", "data", "steps"})
PROCESSOR_NAMES: Final = RUN_NAMES | {"output", "result"}


def _fail(field: str, problem: str) -> InvalidWorkflow:
    """An error about one field; `decode_workflow` turns the field into its line."""
    return InvalidWorkflow(f"`{field}`: {problem}")


def _token(value: str, field: str) -> None:
    try:
        check_token(value, field)
    except ConfigError as exc:
        raise _fail(field, exc.reason) from None


def _topic(value: str, field: str) -> None:
    try:
        check_topic(value)
    except ConfigError as exc:
        raise _fail(field, exc.reason) from None


def _positive(value: float | None, field: str, *, least: float = 0, strict: bool = True) -> None:
    if value is not None and (value <= least if strict else value < least):
        raise _fail(field, f"must be {'more than' if strict else 'at least'} {least}")


def _expressions(
    field: str, source: str, names: frozenset[str], *, condition: bool = False
) -> list[tuple[str, Expression]]:
    """Parse a template (or a condition) and check it reads only names the run will have."""
    if not source:
        return []
    try:
        found = [parse(source)] if condition else Template(source).expressions
    except ExpressionError as exc:
        raise _fail(field, exc.reason) from None
    for expression in found:
        unknown = expression.names() - names
        if unknown:
            raise _fail(
                field,
                f"expression `{expression.source}` reads {', '.join(sorted(unknown))}; it can "
                f"read {', '.join(sorted(names))}",
            )
    return [(field, expression) for expression in found]


def _check_references(
    expressions: Iterable[tuple[str, Expression]], where: str, earlier: set[str]
) -> None:
    """Refuse reading a step that has not run yet (a later one, or one that does not exist).

    `where` is the path of the step (`steps[2]`), so the error points at the field's line.
    """
    for field, expression in expressions:
        later = expression.step_references() - earlier
        if later:
            raise _fail(
                f"{where}.{field}" if where else field,
                f"expression `{expression.source}` reads steps."
                f"{', steps.'.join(sorted(later))}, which is not an earlier step",
            )


def _unique(keys: list[str], what: str) -> None:
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise InvalidWorkflow(f"two {what}s are called {key!r}; give each a distinct `name`")
        seen.add(key)


class Target(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """Who does a piece of work: an agent by name or any agent with a capability."""

    agent: str = ""
    capability: str = ""
    instructions: str = ""  # added to the agent's own instructions for this task
    timeout: float | None = None  # seconds for one attempt; default: the client's timeout
    retries: int = 0  # further attempts after a failed one

    def __post_init__(self) -> None:
        if self.human:
            _check_human(self)
            return
        if bool(self.agent) == bool(self.capability):
            raise InvalidWorkflow("give exactly one of `agent` or `capability`")
        _token(self.agent or self.capability, "agent" if self.agent else "capability")
        _positive(self.timeout, "timeout")
        _positive(self.retries, "retries", strict=False)

    @property
    def human(self) -> bool:
        """A step a person answers (`type: human`, pipeline and process steps)."""
        return getattr(self, "type", "agent") == "human"

    @property
    def target(self) -> str:
        """How the target reads in messages: the agent name or `capability <name>`."""
        if self.human:
            return "a person"
        return self.agent or f"capability {self.capability}"


HUMAN_STEP_DOC: Final = """A step of `type: human` (pipeline and process steps): the run waits
(status `waiting`) until a person answers `prompt` (a template) with JSON that `schema`
accepts, or `timeout` seconds pass and `on_timeout` decides: `approve` or `reject` (the step
completes with `{"approved": true|false, "timed_out": true}`) or `fail` (the step and the run
fail)."""


def _check_human(step: Any) -> None:
    if step.agent or step.capability:
        raise _fail("type", "a human step has no `agent` or `capability`: a person answers it")
    if not step.prompt:
        raise _fail("prompt", "a human step needs a `prompt`: what the person is asked")
    if not getattr(step, "name", ""):
        raise _fail("type", "a human step needs a `name` (its answer is read as steps.<name>)")
    for field in ("instructions", "input", "output", "processor"):
        if getattr(step, field, ""):
            raise _fail(field, f"a human step has no `{field}`; its answer is its output")
    if step.retries:
        raise _fail("retries", "a human step is asked once; it has no `retries`")
    _positive(step.timeout, "timeout")
    if step.on_timeout is not None and step.timeout is None:
        raise _fail("on_timeout", "give a `timeout` (seconds) for `on_timeout` to apply")
    if step.schema is not None:
        check_answer_schema(step.schema)
    _expressions("prompt", step.prompt, RUN_NAMES)


def _agent_expressions(step: Target) -> list[tuple[str, Expression]]:
    """A human step's prompt reads the run like an input template does."""
    if step.human:
        return _expressions("prompt", getattr(step, "prompt", ""), RUN_NAMES)
    return []


class WorkflowBase(
    msgspec.Struct,
    tag_field="type",
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    omit_defaults=True,
):
    name: str
    description: str = ""
    budget: RunBudget | None = None  # what each run may spend (chorus.specs.budget)

    def __post_init__(self) -> None:
        _token(self.name, "name")

    @property
    def kind(self) -> WorkflowKind:
        """The workflow's `type:`."""
        return cast(WorkflowKind, type(self).__struct_config__.tag)


# pipeline


class Step(Target, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One pipeline step. Its input is the previous step's output (the run's input for the
    first), or the `input` template; `output` (a template) or `processor` (a Python function)
    reshapes what it passes on."""

    name: str = ""
    input: str = ""
    output: str = ""
    processor: str = ""  # a name in the engine's `processors` registry; never imported
    # type: human (HUMAN_STEP_DOC)
    type: StepType = "agent"
    prompt: str = ""
    schema: dict[str, Any] | None = None
    on_timeout: TimeoutAction | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name:
            _token(self.name, "name")
        if self.output and self.processor:
            raise InvalidWorkflow("give `output` (a template) or `processor`, not both")
        self.expressions()

    @property
    def key(self) -> str:
        return self.name or self.agent or self.capability

    def expressions(self) -> list[tuple[str, Expression]]:
        return (
            _expressions("input", self.input, RUN_NAMES)
            + _expressions("output", self.output, PROCESSOR_NAMES)
            + _agent_expressions(self)
        )


class Pipeline(WorkflowBase, tag="pipeline", frozen=True):
    """Steps one after another; each step's output is the next step's input."""

    steps: list[Step]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.steps:
            raise _fail("steps", "a pipeline needs at least one step")
        _unique([s.key for s in self.steps], "step")
        earlier: set[str] = set()
        for index, step in enumerate(self.steps):
            _check_references(step.expressions(), f"steps[{index}]", earlier)
            earlier.add(step.key)


# parallel

_INPUT_NAMES: Final = frozenset({"input", "data"})


class ParallelTask(Target, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One task of a parallel run. Its input is the run's input, or the `input` template."""

    name: str = ""
    input: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name:
            _token(self.name, "name")
        _expressions("input", self.input, _INPUT_NAMES)

    @property
    def key(self) -> str:
        return self.name or self.agent or self.capability


class Parallel(WorkflowBase, tag="parallel", frozen=True):
    """Tasks at once, never more than `max_concurrency` in flight.

    A failed task does not stop the others. The run completes when at least `min_success`
    tasks succeeded (each task's success, output or error is in the run record), and fails
    otherwise. Set `min_success` to the number of tasks to require all of them.
    """

    tasks: list[ParallelTask]
    max_concurrency: int = 4
    min_success: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tasks:
            raise _fail("tasks", "a parallel workflow needs at least one task")
        _unique([t.key for t in self.tasks], "task")
        _positive(self.max_concurrency, "max_concurrency", least=1, strict=False)
        if not 0 <= self.min_success <= len(self.tasks):
            raise _fail(
                "min_success", f"must be between 0 and the number of tasks ({len(self.tasks)})"
            )


# event-driven


class EventDriven(WorkflowBase, tag="event", frozen=True):
    """Publish `start`, let subscribed agents react, finish when `until` arrives for this run.

    Every event carries the run id (agents pass it on to the events they emit), so the run
    follows its own chain of events and keeps it in the run record.
    """

    start: str
    until: str
    data: str = ""  # template for the start event's data; default: the run's data or input
    timeout: float = 60.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _topic(self.start, "start")
        if "*" in self.start or ">" in self.start:
            raise _fail("start", "must be a topic without wildcards")
        _topic(self.until, "until")
        _positive(self.timeout, "timeout")
        _expressions("data", self.data, _INPUT_NAMES)


# hierarchical


class Hierarchical(WorkflowBase, tag="hierarchical", frozen=True):
    """A supervisor plans subtasks with required capabilities, workers do them (in parallel
    where `depends_on` allows), and the supervisor compiles the answer."""

    supervisor: str  # the supervisor agent's name
    instructions: str = ""  # extra planning instructions
    compile_instructions: str = ""
    max_concurrency: int = 4
    max_subtasks: int = 8
    timeout: float | None = None  # seconds for each task
    retries: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _token(self.supervisor, "supervisor")
        _positive(self.max_concurrency, "max_concurrency", least=1, strict=False)
        _positive(self.max_subtasks, "max_subtasks", least=1, strict=False)
        _positive(self.timeout, "timeout")
        _positive(self.retries, "retries", strict=False)


# business process


class ProcessStep(Target, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A named step. `when` false: the step is skipped. `require` false: the process fails
    here. Both are read before the step runs, on the run's input and earlier steps."""

    name: str
    input: str = ""  # template; default: the run's input
    when: str = ""
    require: str = ""
    # type: human (HUMAN_STEP_DOC)
    type: StepType = "agent"
    prompt: str = ""
    schema: dict[str, Any] | None = None
    on_timeout: TimeoutAction | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _token(self.name, "name")
        self.expressions()

    @property
    def key(self) -> str:
        return self.name

    def expressions(self) -> list[tuple[str, Expression]]:
        return (
            _expressions("input", self.input, RUN_NAMES)
            + _expressions("when", self.when, RUN_NAMES, condition=True)
            + _expressions("require", self.require, RUN_NAMES, condition=True)
            + _agent_expressions(self)
        )


class Process(WorkflowBase, tag="process", frozen=True):
    """Named steps with conditions; its status (running/completed/failed) is kept in KV."""

    steps: list[ProcessStep]
    output: str = ""  # template for the result; default: the output of the last step that ran

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.steps:
            raise _fail("steps", "a process needs at least one step")
        _unique([s.name for s in self.steps], "step")
        earlier: set[str] = set()
        for index, step in enumerate(self.steps):
            _check_references(step.expressions(), f"steps[{index}]", earlier)
            earlier.add(step.name)
        _check_references(_expressions("output", self.output, RUN_NAMES), "", earlier)


WorkflowSpec = Pipeline | Parallel | EventDriven | Hierarchical | Process
"""Any workflow; YAML and JSON pick the pattern by `type:`."""


# files

# "unknown field `x` - at `$.path`" (msgspec) or "`x`: problem - at `$.path`" (our checks)
_FIELD_ERROR = re.compile(
    r"(?:unknown field `([^`]+)`|^`([^`]+)`: ).*?(?: - at `\$((?:\.[^.\[`]+|\[\d+\])*)`)?$"
)
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_WHERE = re.compile(r"^ \(field [^)]*\)")


def decode_workflow(text: str, source: str = "<string>") -> WorkflowSpec:
    """A workflow from YAML (or JSON) text; ConfigError naming the field and line when wrong."""
    try:
        return decode_yaml(text, WorkflowSpec, source)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ConfigError(_locate_field(exc.reason, text, source)) from None


def load_workflow(path: str | Path) -> WorkflowSpec:
    """Read a workflow file; ConfigError naming the file, field and line when it is wrong."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read workflow {file}: {exc.strerror}") from None
    return decode_workflow(text, str(file))


def _locate_field(reason: str, text: str, source: str) -> str:
    """msgspec gives the path of the struct that failed: point at the offending key's line."""
    if not reason.startswith(source):
        return reason
    message = _WHERE.sub("", reason[len(source) :]).removeprefix(": ")
    match = _FIELD_ERROR.search(message)
    if match is None:
        return reason
    # our own errors may name a path below the struct that failed: `steps[2].when`
    name, path = match.group(1) or match.group(2), match.group(3) or ""
    if match.group(2):
        head, _, name = f".{name}".rpartition(".")
        path += head
    node: Any = yaml.compose(text, Loader=yaml.SafeLoader)
    for key, index in _PATH_PART.findall(path):
        if isinstance(node, yaml.MappingNode) and key:
            node = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
        elif isinstance(node, yaml.SequenceNode) and index and int(index) < len(node.value):
            node = node.value[int(index)]
        else:
            return reason
    if not isinstance(node, yaml.MappingNode):
        return reason
    line = next(
        (k.start_mark.line + 1 for k, _ in node.value if getattr(k, "value", None) == name), None
    )
    if line is None:
        return reason
    field = f"{path.lstrip('.')}.{name}" if path else name
    return f"{source} (field {field}, line {line}): {message}"


def find_workflow(name: str, folders: Sequence[Path]) -> WorkflowSpec:
    """The workflow called `name` (`<name>.yaml` or `.yml`) in the first folder that has it."""
    check_token(name, "workflow name")
    for folder in folders:
        for suffix in (".yaml", ".yml"):
            path = folder / f"{name}{suffix}"
            if path.is_file():
                return load_workflow(path)
    known = sorted({p.stem for d in folders if d.is_dir() for p in d.glob("*.y*ml")})
    raise NotFound(f"no workflow named {name!r}; known: {', '.join(known) or 'none'}")


def expected_steps(workflow: WorkflowSpec) -> int | None:
    """How many steps a run of the workflow has; None while it is not known (a plan's)."""
    if isinstance(workflow, Parallel):
        return len(workflow.tasks)
    if isinstance(workflow, EventDriven):
        return 2  # publish the start event, wait for the final one
    if isinstance(workflow, Hierarchical):
        return None
    return len(workflow.steps)
