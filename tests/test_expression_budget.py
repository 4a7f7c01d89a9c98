"""Expressions and templates from the wire are bounded: sizes are refused before values are
built, every evaluation has a work and a time budget, evaluation at run time is off the event
loop, and whatever goes wrong is an ExpressionError naming the expression."""

from __future__ import annotations

import threading
import tracemalloc
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from chorus.agent import Agent, Context
from chorus.errors import ExpressionError
from chorus.messages import Task
from chorus.specs.expressions import (
    MAX_VALUE_SIZE,
    MAX_WORK,
    evaluate,
    evaluate_async,
    parse,
)
from chorus.specs.templates import MAX_RENDERED_CHARS, Template
from chorus.workflows import Process, ProcessStep
from chorus.workflows.engine import Engine, new_record
from tests.helpers import StartHost

QUADRATIC = "[['a']*100000]*100000 == [['a']*100000]*100000"


def peak_allocation(call: Callable[[], object]) -> int:
    """The most memory Python held at once (bytes above the start) while `call` ran."""
    tracemalloc.start()
    try:
        with pytest.raises(ExpressionError):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_quadratic_comparison_is_refused_before_it_is_built() -> None:
    assert len(QUADRATIC) == 46
    with pytest.raises(ExpressionError) as caught:
        evaluate(QUADRATIC, {})

    assert caught.value.reason.startswith(f"expression `{QUADRATIC}`: ")
    assert f"would be over the limit of {MAX_VALUE_SIZE}" in caught.value.reason


def test_a_billion_characters_are_refused_before_they_are_allocated() -> None:
    peak = peak_allocation(lambda: evaluate("'a' * 1000000000", {}))

    assert peak < 5_000_000


@pytest.mark.parametrize(
    "source",
    [
        "'ab' * 600000",
        "'a' * 999999 + 'b' * 999999",
        "[1] * 100001",
        "['a' * 999999] * 2",
        "str(['a' * 500000, 'b' * 500000])",
        "upper('ß' * 500000)",
    ],
)
def test_results_over_the_size_limits_are_refused_before_they_are_made(source: str) -> None:
    with pytest.raises(ExpressionError, match="would be over the limit"):
        evaluate(source, {})


def test_work_over_the_budget_is_refused_naming_the_expression() -> None:
    source = " and ".join(["['a'] * 99999 == ['a'] * 99999"] * 30)

    with pytest.raises(ExpressionError) as caught:
        evaluate(source, {})

    assert caught.value.reason.startswith(f"expression `{source}`: ")
    assert f"the work budget of {MAX_WORK} units was exceeded" in caught.value.reason


def test_comparing_big_context_values_is_charged_to_the_budget() -> None:
    big = {"text": "x" * 900_000}
    source = " and ".join(["data.text == data.text"] * 5)

    with pytest.raises(ExpressionError, match="work budget"):
        evaluate(source, {"data": big})
    assert evaluate("data.text == data.text", {"data": big}) is True


def test_a_template_with_3000_big_placeholders_is_refused_without_building_them_all() -> None:
    template = Template("{{ 'a' * 999999 }}" * 3000)

    peak = peak_allocation(lambda: template.render({}))

    with pytest.raises(ExpressionError, match=f"over the limit of {MAX_RENDERED_CHARS} char"):
        template.render({})
    assert peak < 20_000_000


async def test_a_template_over_the_rendered_limit_is_refused_when_rendered_async() -> None:
    template = Template("{{ input }}" * 30)

    with pytest.raises(ExpressionError, match="rendered text would be over the limit"):
        await template.render_async({"input": "y" * 50_000})


@pytest.mark.parametrize(
    "source",
    [
        "-" * 1999 + "1",
        "not " * 400 + "True",
        "(" * 300 + "1" + ")" * 300,
        "+".join(["1"] * 500),
        "[" * 150 + "]" * 150,
    ],
)
def test_a_deeply_nested_expression_is_refused(source: str) -> None:
    with pytest.raises(ExpressionError, match=r"nested too deeply|invalid syntax"):
        parse(source)


def test_deeply_nested_context_values_fail_as_expression_errors() -> None:
    deep: list[Any] = []
    for _ in range(20_000):
        deep = [deep]
    other: list[Any] = []
    for _ in range(20_000):
        other = [other]

    with pytest.raises(ExpressionError):
        evaluate("data == other", {"data": deep, "other": other})
    with pytest.raises(ExpressionError):
        evaluate("str(data)", {"data": deep})


class Opaque:
    """Not a JSON value: a context should never hold one, but if it does, no crash."""


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("{[1]: 2}", "unhashable type"),
        ("float('1e999')", "not a finite number"),
        ("1e308 * 10", "not a finite number"),
        ("int('9' * 5000)", "int():"),
        ("round(10, -1000)", "digits must be within"),
        ("'%s' % 1", "% formatting of text is not allowed"),
        ("'%999999999d' % 1", "% formatting of text is not allowed"),
        ("[1, 2][::0]", "slice step cannot be zero"),
        ("min([])", "needs at least one value"),
        ("min([1, 'a'])", "min():"),
        ("str(data)", "str():"),
        ("data == data", ""),
    ],
)
def test_every_python_error_is_an_expression_error(source: str, problem: str) -> None:
    try:
        value = evaluate(source, {"data": Opaque()})
    except ExpressionError as exc:
        assert exc.reason.startswith(f"expression `{source}`: ")
        assert problem in exc.reason
    else:
        assert source == "data == data" and value is True  # identity: nothing to go wrong


class ThreadNoting(Mapping[str, Any]):
    """A context that notes which thread reads it."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.readers: set[int] = set()

    def __getitem__(self, key: str) -> Any:
        self.readers.add(threading.get_ident())
        return self.values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


async def test_async_evaluation_runs_off_the_event_loop() -> None:
    context = ThreadNoting({"data": {"amount": 2500}})

    assert await evaluate_async("data.amount > 1000", context) is True
    assert await Template("{{ data.amount }} EUR").render_async(context) == "2500 EUR"
    assert context.readers and threading.get_ident() not in context.readers


async def test_an_async_evaluation_past_its_deadline_is_refused() -> None:
    with pytest.raises(ExpressionError, match=r"the time budget of 0\.0s was exceeded"):
        await parse("len(['a'] * 50000) > 0").evaluate_async({}, timeout=0.0)


@pytest.mark.parametrize(
    ("source", "value"),
    [
        ("data.amount > 1000 and not data.owner", True),
        ("'eu' in data.tags", True),
        ("data.tags[-1]", "eu"),
        ("str(data.tags)", '["new","eu"]'),
        ("len(data.tags) * 2 + 1", 5),
        ("round(2.567, 2)", 2.57),
        ("['a'] * 3 + ['b']", ["a", "a", "a", "b"]),
        ("max(data.amount, 10)", 2500),
    ],
)
async def test_ordinary_expressions_still_evaluate(source: str, value: Any) -> None:
    context = {"data": {"amount": 2500, "tags": ["new", "eu"], "owner": None}}

    assert evaluate(source, context) == value
    assert await evaluate_async(source, context) == value


async def test_a_condition_over_budget_fails_its_process_step_and_the_engine_runs_on(
    start_host: StartHost, engine: Engine
) -> None:
    clerk = Agent(name="clerk")

    @clerk.on_task
    async def answer(task: Task, ctx: Context) -> str:
        return "filed"

    await start_host(clerk)
    greedy = Process(name="greedy", steps=[ProcessStep(name="s", agent="clerk", when=QUADRATIC)])
    plain = Process(name="plain", steps=[ProcessStep(name="s", agent="clerk", when="1 < 2")])

    failed = await engine.run(new_record(greedy, "x"))
    after = await engine.run(new_record(plain, "x"))

    assert failed.status == "failed"
    assert failed.error.startswith(f"step s: expression `{QUADRATIC}`: ")
    assert after.status == "completed", after.error
    assert after.output == "filed"
