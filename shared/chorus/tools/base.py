"""The tool interface the agent loop calls, whatever the tool is.

A `Tool` has a `ToolDefinition` (what the model sees: a name, a description, a JSON schema of
its arguments) and `call`. A `ToolSource` is a group of tools that has to be started and
closed (an MCP server, the peers read from the registry). The loop validates nothing itself:
a tool validates its own arguments and raises `ToolFailed` with a message for the model when
they are wrong, when it fails, or when it times out; the loop turns any other exception into
a `ToolFailed` too, so a tool can never crash the agent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from chorus.errors import ToolFailed
from chorus.messages import Usage
from chorus.specs.tools import ApprovalPolicy

if TYPE_CHECKING:
    from chorus.client import ChorusClient, TaskQueue

__all__ = ["Tool", "ToolCallContext", "ToolDefinition", "ToolFailed", "ToolSource"]

MAX_TOOL_NAME = 64  # OpenAI's limit on function names
DEFAULT_TOOL_TIMEOUT_S = 60.0


class ToolDefinition(msgspec.Struct, frozen=True, kw_only=True):
    """What the model is told about a tool."""

    name: str  # letters, digits, `_` and `-`, at most MAX_TOOL_NAME
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    side_effect: bool = False  # calls go through the effect ledger (never silently repeated)
    timeout_s: float = DEFAULT_TOOL_TIMEOUT_S
    # A person decides on a call before it runs (the task is parked meanwhile): see
    # chorus.client.approvals. Set from the spec entry's `approval*` keys.
    approval: ApprovalPolicy | None = None


@dataclass
class ToolCallContext:
    """What a tool may know about the call it serves."""

    agent: str
    instance: str
    task_id: str = ""
    run_id: str = ""
    attempt: int = 1
    call_id: str = ""  # the model's id for this call (differs between attempts)
    depth: int = 0  # how many agents-as-tools deep this task already is
    client: ChorusClient | None = None  # request-reply to peers, events
    queue: TaskQueue | None = None  # durable tasks to peers
    extra: dict[str, Any] = field(default_factory=dict)
    # Set by a tool that had another instance serve the call (a peer): who answered, and the
    # tokens it spent, which the loop adds to the task's usage and the call's record.
    answered_by: str = ""
    usage: Usage = field(default_factory=Usage)
    # The task identity that stays the same across its retries (a durable task's id; a
    # workflow step's `<run>-<step>`): side-effect calls are keyed by it (chorus.tools.ledger).
    effect_scope: str = ""


class Tool(Protocol):
    @property
    def definition(self) -> ToolDefinition: ...

    async def call(self, arguments: dict[str, Any], ctx: ToolCallContext) -> Any:
        """Run the tool; return anything msgspec can encode (text, numbers, Structs, dicts).
        Raise ToolFailed with a reason the model can act on."""
        ...


class ToolSource(Protocol):
    """Tools that need starting (connect, list, spawn) and closing."""

    async def start(self) -> Sequence[Tool]: ...

    async def close(self) -> None: ...
