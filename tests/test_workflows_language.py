"""Workflow files and the condition/template language: no server needed."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from chorus.errors import ConfigError, ExpressionError, InvalidPlan, InvalidWorkflow
from chorus.messages import DelegationPlan, RunRequest, decode, encode
from chorus.specs.expressions import evaluate, parse
from chorus.specs.templates import Template
from chorus.workflows import Parallel, ParallelTask, Pipeline, Step, decode_workflow
from chorus.workflows.events import topic_matches
from chorus.workflows.plan import PLAN_SCHEMA, check_plan

CONTEXT: dict[str, Any] = {
    "input": "Check ACME Ltd",
    "data": {"amount": 2500, "tags": ["new", "eu"], "owner": None},
    "steps": {
        "research": {"output": "ACME makes anvils", "data": {"score": 0.8, "flags": []}},
        "assess": {"output": "", "data": None, "status": "skipped"},
    },
}


# the expression language


@pytest.mark.parametrize(
    ("source", "value"),
    [
        ("data.amount > 1000", True),
        ("data.amount > 1000 and not data.owner", True),
        ("data['amount'] * 2 + 1", 5001),
        ("data.amount // 1000 % 2", 0),
        ("data.amount / 1000", 2.5),
        ("-data.amount", -2500),
        ("'eu' in data.tags", True),
        ("'us' not in data.tags", True),
        ("data.tags[-1]", "eu"),
        ("input[0:5]", "Check"),
        ("len(data.tags) == 2", True),
        ("contains(lower(steps.research.output), 'anvil')", True),
        ("startswith(input, 'Check') and endswith(input, 'Ltd')", True),
        ("upper(strip('  a  '))", "A"),
        ("steps.research.data.score >= 0.5", True),
        ("get(steps.research.data, 'missing', 'none')", "none"),
        ("steps.assess.status == 'skipped'", True),
        ("data.owner is None", True),
        ("1 < data.amount < 3000", True),
        ("'big' if data.amount > 1000 else 'small'", "big"),
        ("max(data.amount, 10, 99)", 2500),
        ("min([3, 1, 2])", 1),
        ("int('42') + float('0.5')", 42.5),
        ("round(2.567, 2)", 2.57),
        ("str(data.tags)", '["new","eu"]'),
        ("abs(-3)", 3),
        ("bool(steps.assess.output) or 'fallback'", "fallback"),
        ("{'a': 1, 'b': [1, 2]}['b'][1]", 2),
    ],
)
def test_expressions_evaluate_against_the_context(source: str, value: Any) -> None:
    assert evaluate(source, CONTEXT) == value


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("__import__('os')", "unknown function '__import__'"),
        ("__import__", "names starting with '_' are not allowed"),
        ("data.__class__", "attributes starting with '_' are not allowed (.__class__)"),
        ("input.__class__.__mro__", "attributes starting with '_' are not allowed"),
        ("data['__class__']", "keys starting with '_' are not allowed"),
        ("(lambda: 1)()", "lambda is not allowed"),
        ("[x for x in data.tags]", "comprehensions are not allowed"),
        ("{k: 1 for k in data}", "comprehensions are not allowed"),
        ("any(x for x in data.tags)", "generator expressions are not allowed"),
        ("f'{input}'", "f-strings are not allowed"),
        ("(x := 1)", "assignment (:=) is not allowed"),
        ("input.lower()", "calling methods is not allowed"),
        ("open('/etc/passwd')", "unknown function 'open'"),
        ("getattr(data, 'x')", "unknown function 'getattr'"),
        ("len(*data.tags)", "* unpacking is not allowed"),
        ("round(1.5, ndigits=1)", "round() takes no keyword arguments"),
        ("len(1, 2)", "len() takes 1 arguments, not 2"),
        ("2 ** 100000", "the operator ** is not allowed"),
        ("1 << 100000", "the operator << is not allowed"),
        ("~1", "~ is not allowed"),
        ("{1, 2}", "set literals are not allowed"),
        ("import os", "invalid syntax"),
        ("data; input", "invalid syntax"),
        ("", "an expression is empty"),
    ],
)
def test_dangerous_or_unknown_syntax_is_refused_when_parsed(source: str, problem: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        parse(source)

    assert problem in caught.value.reason
    assert source.strip() == "" or f"`{source}`" in caught.value.reason


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("nobody", "unknown name 'nobody' (known names: data, input, steps)"),
        ("steps.draft.output", "steps has no key 'draft' (keys: assess, research)"),
        ("data.tags[5]", "data.tags has no item 5 (it has 2)"),
        ("data.amount > 'x'", "cannot evaluate data.amount > 'x' with int and str"),
        ("data.amount / 0", "division by zero"),
        ("input.size", "cannot read input.size: input is str, not a mapping"),
        ("'ab' * 10000000", "over the limit"),
        ("lower(data.amount)", "lower(): lower() needs a string, not int"),
    ],
)
def test_evaluation_errors_name_the_expression_and_the_problem(source: str, problem: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        evaluate(source, CONTEXT)

    assert caught.value.reason.startswith(f"expression `{source}`: ")
    assert problem in caught.value.reason


def test_expressions_never_reach_python_objects_behind_the_context() -> None:
    class Secret:
        token = "hunter2"

    with pytest.raises(ExpressionError, match="not a mapping"):
        evaluate("thing.token", {"thing": Secret()})


def test_templates_substitute_expressions_as_text() -> None:
    template = Template(
        "Summarise: {{ steps.research.output }} "
        "({{ data.amount }}, {{ data.tags }}, {{ data.owner }})"
    )

    assert template.render(CONTEXT) == 'Summarise: ACME makes anvils (2500, ["new","eu"], )'


def test_a_template_with_an_unpaired_brace_is_refused() -> None:
    with pytest.raises(ExpressionError, match="unpaired"):
        Template("Summarise: {{ input }")


def test_topic_patterns_match_like_nats_subjects() -> None:
    assert topic_matches("reports.ready", "reports.ready")
    assert topic_matches("reports.*", "reports.ready")
    assert not topic_matches("reports.*", "reports.ready.now")
    assert topic_matches("reports.>", "reports.ready.now")
    assert not topic_matches("reports.>", "reports")
    assert not topic_matches("reports.ready", "reports.readier")


# workflow files


def error_for(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        decode_workflow(text, "flow.yaml")
    return caught.value.reason


def test_an_unknown_field_is_named_with_its_line() -> None:
    reason = error_for(
        """\
type: pipeline
name: report
steps:
  - agent: researcher
    instructions: Find facts.
    agnet: writer
"""
    )

    assert reason.startswith("flow.yaml (field steps[0].agnet, line 6): ")
    assert "unknown field `agnet`" in reason


def test_an_unknown_top_level_field_is_named_with_its_line() -> None:
    reason = error_for("type: parallel\nname: fan\ntasks:\n  - agent: a\nmax_concurency: 2\n")

    assert reason.startswith("flow.yaml (field max_concurency, line 5): ")


def test_a_wrong_type_is_named_with_its_line() -> None:
    reason = error_for("type: parallel\nname: fan\nmax_concurrency: two\ntasks:\n  - agent: a\n")

    assert reason == (
        "flow.yaml (field max_concurrency, line 3): Expected `int`, got `str` - at "
        "`$.max_concurrency`"
    )


def test_a_step_with_two_targets_is_refused_with_its_line() -> None:
    reason = error_for(
        "type: pipeline\nname: p\nsteps:\n  - agent: a\n  - agent: b\n    capability: c\n"
    )

    assert reason.startswith(
        "flow.yaml (field steps[1], line 5): give exactly one of `agent` or `capability`"
    )


def test_an_unknown_pattern_is_refused() -> None:
    reason = error_for("type: pipe\nname: p\n")

    assert reason == "flow.yaml (field type, line 1): Invalid value 'pipe' - at `$.type`"


def test_a_dangerous_condition_is_refused_before_anything_runs() -> None:
    reason = error_for(
        """\
type: process
name: p
steps:
  - name: first
    agent: a
    when: "__import__('os').system('rm -rf /')"
"""
    )

    assert reason.startswith("flow.yaml (field steps[0].when, line 6): `when`: expression ")
    assert "unknown function '__import__'" in reason


def test_a_condition_reading_a_later_step_is_refused_with_its_line() -> None:
    reason = error_for(
        """\
type: process
name: p
steps:
  - name: first
    agent: a
  - name: second
    agent: b
    require: "steps.third.output != ''"
  - name: third
    agent: c
"""
    )

    assert reason.startswith("flow.yaml (field steps[1].require, line 8): ")
    assert "reads steps.third, which is not an earlier step" in reason


def test_a_template_reading_an_unknown_name_is_refused() -> None:
    reason = error_for(
        "type: pipeline\nname: p\nsteps:\n  - agent: a\n    output: 'Summary: {{ outptu }}'\n"
    )

    assert reason.startswith("flow.yaml (field steps[0].output, line 5): ")
    assert "reads outptu; it can read data, input, output, result, steps" in reason


def test_invalid_yaml_is_reported() -> None:
    assert error_for("type: [pipeline\n").startswith("flow.yaml: not valid YAML")


def test_a_python_workflow_is_checked_when_built() -> None:
    with pytest.raises(InvalidWorkflow, match="`min_success`: must be between 0 and"):
        Parallel(name="p", min_success=3, tasks=[ParallelTask(agent="a")])
    with pytest.raises(InvalidWorkflow, match="two steps are called 'a'"):
        Pipeline(name="p", steps=[Step(agent="a"), Step(agent="a")])
    with pytest.raises(InvalidWorkflow, match=r"steps\.b, which is not an earlier step"):
        Pipeline(name="p", steps=[Step(agent="a", input="{{ steps.b.output }}"), Step(agent="b")])


def test_yaml_and_python_give_the_same_workflow() -> None:
    from_yaml = decode_workflow(
        "type: pipeline\nname: p\nsteps:\n"
        "  - agent: a\n"
        "  - capability: w\n    output: '{{ output }}!'\n"
    )

    assert from_yaml == Pipeline(
        name="p", steps=[Step(agent="a"), Step(capability="w", output="{{ output }}!")]
    )


def test_a_workflow_travels_inline_in_a_run_request() -> None:
    workflow = Pipeline(name="p", steps=[Step(agent="a", instructions="Go.")])

    request = decode(encode(RunRequest(workflow=workflow, input="x")), RunRequest)

    assert request.workflow == workflow
    assert b'"type":"pipeline"' in encode(request)


def test_a_bad_inline_workflow_in_a_run_request_is_an_invalid_message() -> None:
    from chorus.errors import InvalidMessage

    payload = b'{"workflow": {"type": "pipeline", "name": "p", "steps": []}}'

    with pytest.raises(InvalidMessage, match="a pipeline needs at least one step"):
        decode(payload, RunRequest)


# plans


def test_the_plan_schema_suits_strict_structured_output() -> None:
    assert PLAN_SCHEMA["type"] == "object"
    assert PLAN_SCHEMA["additionalProperties"] is False
    subtask = PLAN_SCHEMA["$defs"]["Subtask"]
    assert subtask["additionalProperties"] is False
    assert sorted(subtask["required"]) == sorted(subtask["properties"])


def plan(*subtasks: tuple[str, list[str], list[str]]) -> DelegationPlan:
    return msgspec.convert(
        {
            "subtasks": [
                {"id": i, "description": "d", "capabilities": c, "depends_on": d}
                for i, c, d in subtasks
            ]
        },
        DelegationPlan,
    )


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (plan(), "the plan has no subtasks"),
        (plan(("a", ["x"], []), ("a", ["x"], [])), "two subtasks have the id 'a'"),
        (plan(("a", [], [])), "subtask a names no capability"),
        (plan(("a b", ["x"], [])), "subtask id 'a b' must use only"),
        (plan(("a", ["x"], ["a"])), "go round in a circle: a -> a"),
        (
            plan(("a", ["x"], ["c"]), ("b", ["x"], ["a"]), ("c", ["x"], ["b"])),
            "go round in a circle: a -> c -> b -> a",
        ),
        (plan(*[(f"s{i}", ["x"], []) for i in range(9)]), "the plan has 9 subtasks; at most 8"),
    ],
)
def test_plans_that_cannot_be_carried_out_are_refused(bad: DelegationPlan, problem: str) -> None:
    with pytest.raises(InvalidPlan, match=problem.replace("(", r"\(")):
        check_plan(bad, max_subtasks=8)


def test_a_plan_with_a_diamond_of_dependencies_is_accepted() -> None:
    check_plan(
        plan(("a", ["x"], []), ("b", ["x"], ["a"]), ("c", ["x"], ["a"]), ("d", ["y"], ["b", "c"])),
        max_subtasks=8,
    )
