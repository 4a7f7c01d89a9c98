"""Python functions as tools: the schema from the signature and docstring, validation, returns."""

from __future__ import annotations

import json
import threading
from typing import Literal

import msgspec
import pytest

from chorus.agent.toolbox import build_toolbox
from chorus.errors import ConfigError, ToolFailed
from chorus.specs.agent import AgentSpec
from chorus.specs.tools import ToolSpec
from chorus.tools import ToolCallContext, tool
from chorus.tools.python import load_python_tool

CTX = ToolCallContext(agent="tester", instance="tester-1", task_id="t1")


class Definition(msgspec.Struct):
    term: str
    text: str
    sources: list[str] = []


@tool
async def define(
    term: str, style: Literal["short", "long"] = "short", max_words: int = 40
) -> Definition:
    """Look a term up in the team's glossary.

    Only terms of the messaging world are in it.

    Args:
        term: the word or phrase
            to define
        style: how much to say
        max_words: the longest answer wanted
    """
    return Definition(term=term, text=f"{term}: a {style} definition", sources=["glossary"])


def test_schema_comes_from_the_signature_and_the_docstring() -> None:
    definition = define.definition

    assert definition.name == "define"
    assert definition.description == "Look a term up in the team's glossary."
    assert definition.parameters == {
        "type": "object",
        "properties": {
            "term": {"type": "string", "description": "the word or phrase to define"},
            "style": {
                "enum": ["long", "short"],
                "description": "how much to say",
                "default": "short",
            },
            "max_words": {
                "type": "integer",
                "description": "the longest answer wanted",
                "default": 40,
            },
        },
        "required": ["term"],
        "additionalProperties": False,
    }


async def test_a_struct_return_value_is_returned_as_is_for_the_loop_to_encode() -> None:
    value = await define.call({"term": "NATS", "style": "long"}, CTX)

    assert value == Definition(term="NATS", text="NATS: a long definition", sources=["glossary"])


async def test_a_wrong_argument_is_a_tool_failure_naming_the_field() -> None:
    with pytest.raises(ToolFailed, match=r"invalid arguments for define: .* at `\$.max_words`"):
        await define.call({"term": "NATS", "max_words": "many"}, CTX)


async def test_an_unknown_argument_is_a_tool_failure_naming_it() -> None:
    with pytest.raises(ToolFailed, match="unknown field `colour`"):
        await define.call({"term": "NATS", "colour": "red"}, CTX)


async def test_a_sync_function_runs_off_the_event_loop() -> None:
    @tool(name="add-numbers", side_effect=True, timeout_s=5)
    def add(a: int, b: int) -> int:
        return a + b if threading.current_thread() is not threading.main_thread() else -1

    assert (add.definition.name, add.definition.side_effect, add.definition.timeout_s) == (
        "add-numbers",
        True,
        5,
    )
    assert await add.call({"a": 2, "b": 3}, CTX) == 5
    assert add(2, 3) == -1  # still the plain function when called directly


async def test_a_context_parameter_is_given_the_call_context_and_hidden_from_the_model() -> None:
    @tool
    async def whoami(ctx: ToolCallContext) -> str:
        """Say who calls."""
        return f"{ctx.instance} on {ctx.task_id}"

    assert whoami.definition.parameters["properties"] == {}
    assert await whoami.call({}, CTX) == "tester-1 on t1"


def test_a_bad_tool_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="tool name 'two words'"):
        tool(name="two words")(lambda: None)


def test_a_python_entry_of_a_spec_loads_the_function() -> None:
    spec = AgentSpec(name="g", tools=[ToolSpec(python="tests.test_python_tools:define")])

    toolbox = build_toolbox(spec)

    assert list(toolbox.tools) == ["define"]
    assert json.loads(json.dumps(toolbox.definitions[0].parameters))["required"] == ["term"]


def test_a_python_entry_naming_a_missing_function_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"cannot load python tool '.*:nope'"):
        load_python_tool("tests.test_python_tools:nope")
