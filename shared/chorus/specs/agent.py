"""The YAML agent spec: what one agent is, independent of how many instances run it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import msgspec

from chorus.errors import ConfigError
from chorus.specs.budget import AgentBudget
from chorus.specs.loading import load_yaml
from chorus.specs.tools import ToolEntry
from chorus.subjects import check_token, check_topic


class SessionSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`session:` in a spec: a task with a `session_id` continues that conversation.

    The history kept is the newest `max_items` items within `max_bytes` of JSON. `policy`
    says what a second task for a session whose turn is running does: `enqueue` (wait, in
    arrival order), `reject` (fail with code session_busy) or `interrupt` (cancel the
    running turn, then go).
    """

    max_items: int = 50
    max_bytes: int = 65536
    policy: Literal["enqueue", "reject", "interrupt"] = "enqueue"

    def __post_init__(self) -> None:
        if self.max_items < 1:
            raise ConfigError(f"session.max_items must be at least 1, got {self.max_items}")
        if self.max_bytes < 256:
            raise ConfigError(f"session.max_bytes must be at least 256, got {self.max_bytes}")


class AgentSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An agent as written in a spec file.

    `handler` names a Python function or Agent (`package.module:attribute`) that replaces the
    default behaviour (ask the model with `instructions` and the task's input).

    `tools` (see `chorus.specs.tools`) are what the model may call; the loop asks it at most
    `max_turns` times per task and runs at most `max_tool_calls_per_turn` calls at once.

    `publishes` (event topics) and `state` (key prefixes in the shared state) say what the
    agent's generated NATS credentials may write (`chorus auth init`); `emits` is always
    allowed. Both default to nothing: an agent that declares none may not publish events
    other than `emits` nor touch the shared state once the server enforces credentials.

    `description` and `input_schema` (a JSON schema with an object root) are what another
    agent's model is told when it may call this agent as a tool (chorus.tools.peers).

    `fallback` lists models (`openai:gpt-5-mini`) tried in order when the one before is
    rate-limited for longer than `fallback_after_s`, has no budget left for the call, or
    fails; `budget` caps what the agent spends per hour and per day (chorus.specs.budget).
    """

    name: str
    instructions: str = ""
    model: str = "offline"
    capabilities: list[str] = []
    max_concurrency: int = 4
    subscribes: list[str] = []
    emits: str | None = None
    tools: list[ToolEntry] = []
    handler: str | None = None
    description: str = ""
    publishes: list[str] = []
    state: list[str] = []
    max_turns: int = 8
    max_tool_calls_per_turn: int = 4
    input_schema: dict[str, Any] | None = None
    session: SessionSpec | None = None  # conversation sessions, off unless given
    fallback: list[str] = []
    fallback_after_s: float = 10.0
    budget: AgentBudget | None = None

    def __post_init__(self) -> None:
        check_token(self.name, "agent name")
        for capability in self.capabilities:
            check_token(capability, "capability")
        for topic in self.subscribes:
            check_topic(topic)
        if self.emits is not None:
            check_topic(self.emits)
        for topic in self.publishes:
            check_topic(topic)
        for prefix in self.state:
            check_state_prefix(prefix)
        if self.max_concurrency < 1:
            raise ConfigError(f"agent {self.name}: max_concurrency must be at least 1")
        if self.input_schema is not None and self.input_schema.get("type") != "object":
            raise ConfigError(
                f"agent {self.name}: input_schema must be a JSON schema with "
                f'"type": "object" at its root (tool arguments are an object)'
            )
        unknown = {t for t in self.tools if isinstance(t, str)} - KNOWN_TOOLS
        if unknown:  # reached when built in Python; a spec file is checked as it is decoded
            raise ConfigError(
                f"agent {self.name}: unknown tools {sorted(unknown)}; known: {sorted(KNOWN_TOOLS)}"
            )
        if self.max_turns < 1:
            raise ConfigError(f"agent {self.name}: max_turns must be at least 1")
        if self.max_tool_calls_per_turn < 1:
            raise ConfigError(f"agent {self.name}: max_tool_calls_per_turn must be at least 1")
        if self.fallback_after_s < 0:
            raise ConfigError(f"agent {self.name}: fallback_after_s must not be negative")
        if self.model in self.fallback:
            raise ConfigError(f"agent {self.name}: fallback repeats its model {self.model!r}")


def check_state_prefix(prefix: str) -> str:
    """A key prefix in the shared state: whole dot-separated tokens, no wildcards."""
    if not prefix or not all(_KEY_TOKEN.match(token) for token in prefix.split(".")):
        raise ConfigError(
            f"state prefix {prefix!r} must be dot-separated tokens of letters, digits, '-' "
            "and '_' (it grants the key itself and every key under it)"
        )
    return prefix


_KEY_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")

# Tools a YAML agent can enable by name; the default handler offers them to the model.
KNOWN_TOOLS = frozenset({"ask_help"})


def load_spec(path: str | Path) -> AgentSpec:
    try:
        return load_yaml(path, AgentSpec)
    except ConfigError as exc:
        if exc.reason.startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {exc.reason}") from None
