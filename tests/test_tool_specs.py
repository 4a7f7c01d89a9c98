"""The `tools:` field of agent spec files: each kind decoded, each mistake named with its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from chorus.errors import ConfigError
from chorus.specs.agent import load_spec
from chorus.specs.tools import McpServer, ToolSpec
from tests.helpers import write_spec

EVERY_KIND = """\
name: toolful
max_turns: 5
max_tool_calls_per_turn: 2
tools:
  - ask_help
  - python: chorus.examples.tools:define
  - capability: research
    description: Finds facts
  - agent: writer
    durable: false
  - mcp: {command: uvx, args: [mcp-server-fetch]}
    prefix: fetch
  - mcp: {url: "https://mcp.example.com/mcp", headers: {Authorization: Bearer x}}
  - hosted: web_search
  - hosted: {type: web_search, search_context_size: low}
"""


def test_every_kind_of_tool_entry_is_decoded(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, "toolful", EVERY_KIND))

    assert (spec.max_turns, spec.max_tool_calls_per_turn) == (5, 2)
    assert spec.tools == [
        "ask_help",
        ToolSpec(python="chorus.examples.tools:define"),
        ToolSpec(capability="research", description="Finds facts"),
        ToolSpec(agent="writer", durable=False),
        ToolSpec(mcp=McpServer(command="uvx", args=["mcp-server-fetch"]), prefix="fetch"),
        ToolSpec(
            mcp=McpServer(url="https://mcp.example.com/mcp", headers={"Authorization": "Bearer x"})
        ),
        ToolSpec(hosted="web_search"),
        ToolSpec(hosted={"type": "web_search", "search_context_size": "low"}),
    ]
    assert spec.tools[7].hosted_tool == {"type": "web_search", "search_context_size": "low"}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("entries", "field", "line", "message"),
    [
        ("  - ask_help\n  - bogus\n", "tools[1]", 4, "Invalid enum value 'bogus'"),
        ("  - python: no_function_here\n", "tools[0]", 3, "must look like package.module:function"),
        (
            "  - capability: research\n    prefix: x\n",
            "tools[0]",
            3,
            "`prefix` does not apply to a capability tool",
        ),
        (
            "  - {python: 'a:b', agent: writer}\n",
            "tools[0]",
            3,
            "exactly one of python, capability, agent, mcp, hosted (got python, agent)",
        ),
        ("  - pyhton: a:b\n", "tools[0].pyhton", 3, "unknown field `pyhton`"),
        (
            "  - mcp: {command: uvx, url: 'http://x'}\n",
            "tools[0].mcp",
            3,
            "exactly one of `command` (stdio) or `url`",
        ),
        ("  - agent: 'two words'\n", "tools[0]", 3, "agent name"),
        ("  - hosted: {search_context_size: low}\n", "tools[0]", 3, "needs a `type`"),
    ],
)
def test_a_bad_tool_entry_names_the_field_and_the_line(
    tmp_path: Path, entries: str, field: str, line: int, message: str
) -> None:
    path = write_spec(tmp_path, "bad", f"name: bad\ntools:\n{entries}")

    with pytest.raises(ConfigError) as caught:
        load_spec(path)

    assert f"(field {field}, line {line})" in caught.value.reason
    assert message in caught.value.reason


def test_max_turns_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_turns must be at least 1"):
        load_spec(write_spec(tmp_path, "bad", "name: bad\nmax_turns: 0\n"))
