"""A supervisor's plan: the schema it is asked for, parsing, checks, and picking workers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec

from chorus.errors import ConfigError, InvalidPlan, RunFailed
from chorus.messages import DelegationPlan, Result, Subtask
from chorus.specs.workflow import Target
from chorus.subjects import check_token


def _plan_schema() -> dict[str, Any]:
    """DelegationPlan's JSON schema with an object at the root, as strict structured output
    (OpenAI) wants, rather than msgspec's `$ref` root."""
    schema = msgspec.json.schema(DelegationPlan)
    definitions: dict[str, Any] = schema["$defs"]
    root = dict(definitions[DelegationPlan.__name__])
    root["$defs"] = {k: v for k, v in definitions.items() if k != DelegationPlan.__name__}
    return root


PLAN_SCHEMA: Final = _plan_schema()


def parse_plan(result: Result) -> DelegationPlan:
    """The plan in the supervisor's answer, validated against DelegationPlan."""
    try:
        if result.data is not None:
            return msgspec.convert(result.data, DelegationPlan)
        return msgspec.json.decode(result.output, type=DelegationPlan)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidPlan(f"the plan does not match the DelegationPlan schema: {exc}") from None


def check_plan(plan: DelegationPlan, max_subtasks: int) -> None:
    """Refuse a plan that cannot be carried out as written; the error says what is wrong."""
    subtasks = plan.subtasks
    if not subtasks:
        raise InvalidPlan("the plan has no subtasks")
    if len(subtasks) > max_subtasks:
        raise InvalidPlan(f"the plan has {len(subtasks)} subtasks; at most {max_subtasks}")
    ids: set[str] = set()
    for subtask in subtasks:
        try:
            check_token(subtask.id, "subtask id")
            for capability in subtask.capabilities:
                check_token(capability, f"capability of subtask {subtask.id}")
        except ConfigError as exc:
            raise InvalidPlan(exc.reason) from None
        if subtask.id in ids:
            raise InvalidPlan(f"two subtasks have the id {subtask.id!r}")
        ids.add(subtask.id)
        if not subtask.description.strip():
            raise InvalidPlan(f"subtask {subtask.id} has no description")
        if not subtask.capabilities:
            raise InvalidPlan(f"subtask {subtask.id} names no capability")
    for subtask in subtasks:
        unknown = [d for d in subtask.depends_on if d not in ids]
        if unknown:
            raise InvalidPlan(
                f"subtask {subtask.id} depends on {', '.join(unknown)}, which the plan does "
                "not have"
            )
    cycle = find_cycle(subtasks)
    if cycle:
        raise InvalidPlan(f"the plan's dependencies go round in a circle: {' -> '.join(cycle)}")


def find_cycle(subtasks: list[Subtask]) -> list[str]:
    """A dependency cycle as a path (`a -> b -> a`), or an empty list."""
    depends = {s.id: s.depends_on for s in subtasks}
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for dependency in depends[node]:
            if state.get(dependency) == 1:
                return [*path[path.index(dependency) :], dependency]
            if dependency not in state:
                found = visit(dependency)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for subtask in subtasks:
        if subtask.id not in state:
            found = visit(subtask.id)
            if found:
                return found
    return []


def choose_workers(
    plan: DelegationPlan, agents: Mapping[str, frozenset[str]] | None
) -> dict[str, Target]:
    """Who does each subtask: any agent with its capability, or, when it needs several, a
    running agent (by name) that has them all. RunFailed naming the capability when no running
    agent has it. Without a directory (`agents` None) each goes to its first capability."""
    if agents is None:
        return {s.id: Target(capability=s.capabilities[0]) for s in plan.subtasks}
    offered: frozenset[str] = frozenset().union(*agents.values())
    chosen: dict[str, Target] = {}
    for subtask in plan.subtasks:
        needed = frozenset(subtask.capabilities)
        missing = sorted(needed - offered)
        if missing:
            raise RunFailed(
                f"subtask {subtask.id} needs capability {', '.join(repr(m) for m in missing)}, "
                f"which no running agent has (running agents offer: "
                f"{', '.join(sorted(offered)) or 'nothing'}); start an agent with it"
            )
        if len(needed) == 1:
            chosen[subtask.id] = Target(capability=subtask.capabilities[0])
            continue
        able = sorted(name for name, capabilities in agents.items() if needed <= capabilities)
        if not able:
            raise RunFailed(
                f"subtask {subtask.id} needs one agent with all of {', '.join(sorted(needed))}, "
                "and no running agent has them all"
            )
        chosen[subtask.id] = Target(agent=able[0])
    return chosen
