"""Other agents, in other processes, as tools a model may call.

A spec's tool entry `{capability: research}` becomes the tool `ask_research`, and
`{agent: writer}` the tool `agent_writer`. Calling it sends the peer a Task:

- `durable: true` (the default) through the coordinator's work queue (`TaskQueue.run`), so
  the call survives the peer instance dying: the task is handed to another instance;
- `durable: false` by request-reply (`ChorusClient.run_task`): quicker, no coordinator
  needed, but a peer that dies mid-call fails the call.

The tool's description and input schema are the peer's own (`description:` and
`input_schema:` in its spec), read from the running instances' `$SRV.INFO` replies when the
tools start, and again at a call while no instance had answered. The Task carries the
caller's run id, a task id derived from the caller's task (`<caller task>-<tool>-<n>`, the
n-th call of this tool in that attempt: a retried durable call finds its outcome), and the
depth plus one, so the peer refuses a loop of agents calling each other (`max_depth`).
Anything that goes wrong comes back as `ToolFailed`, which the model reads.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import msgspec
from nats.aio.client import Client

from chorus.client.discovery import AgentCard, describe_agents
from chorus.errors import ChorusError, ConfigError, TaskFailed, ToolFailed
from chorus.messages import Result, Task, new_id
from chorus.subjects import Subjects, check_token
from chorus.tools.base import MAX_TOOL_NAME, ToolCallContext, ToolDefinition

__all__ = [
    "DEFAULT_INPUT_SCHEMA",
    "PeerOutput",
    "PeerTool",
    "PeerToolSpec",
    "PeerTools",
    "peer_tool",
    "tool_name",
]

DEFAULT_TIMEOUT_S = 300.0  # a peer runs a model of its own, maybe tools: minutes, not seconds
DISCOVER_TIMEOUT_S = 0.5  # the wait for `$SRV.INFO` replies when the tools start
REFRESH_TIMEOUT_S = 0.25  # the same wait at a call, while the peer was never seen
REFRESH_EVERY_S = 30.0  # at most one such wait per tool in this long
MAX_TASK_ID = 120
MAX_COUNTED_ATTEMPTS = 10_000  # caller attempts whose call numbers are remembered

DEFAULT_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"input": {"type": "string", "description": "The whole request, in words."}},
    "required": ["input"],
}

_NOT_NAME = re.compile(r"[^A-Za-z0-9_-]")
_NOT_TASK_ID = re.compile(r"[^A-Za-z0-9_=-]")


class PeerToolSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A `tools:` entry naming a peer: `{capability: NAME}` or `{agent: NAME}`, with
    `durable` (default true), an optional `description` that replaces the peer's own, and
    `timeout_s` for the whole call."""

    capability: str = ""
    agent: str = ""
    durable: bool = True
    description: str = ""
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if bool(self.capability) == bool(self.agent):
            raise ConfigError(
                "a peer tool names exactly one of `capability:` or `agent:` "
                f"(got capability={self.capability!r}, agent={self.agent!r})"
            )
        check_token(self.capability or self.agent, "capability" if self.capability else "agent")
        if not self.timeout_s > 0:
            raise ConfigError(f"peer tool {tool_name(self)}: timeout_s must be positive")

    @property
    def target(self) -> str:
        """How the peer is named in messages to the model."""
        if self.capability:
            return f"the agent with capability {self.capability!r}"
        return f"agent {self.agent!r}"


class PeerOutput(msgspec.Struct, frozen=True, kw_only=True):
    """What a peer call returns: the peer's answer, and who gave it (for the call record)."""

    output: str
    data: Any = None
    agent: str = ""
    instance: str = ""
    task_id: str = ""


def tool_name(spec: PeerToolSpec) -> str:
    """`ask_<capability>` or `agent_<name>`, cut to the 64 characters models accept."""
    raw = f"ask_{spec.capability}" if spec.capability else f"agent_{spec.agent}"
    return _NOT_NAME.sub("_", raw)[:MAX_TOOL_NAME]


class _CallNumbers:
    """The n-th call of one tool within one caller attempt, counted in this process.

    A retried attempt of the caller counts from 1 again, so its n-th call has the id the
    earlier attempt's n-th call had. Bounded: the oldest attempts are forgotten first.
    """

    def __init__(self, limit: int = MAX_COUNTED_ATTEMPTS) -> None:
        self._counts: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._limit = limit

    def next(self, task_id: str, attempt: int) -> int:
        key = (task_id, attempt)
        n = self._counts.pop(key, 0) + 1
        self._counts[key] = n
        if len(self._counts) > self._limit:
            self._counts.popitem(last=False)
        return n


class PeerTool:
    """One peer as a tool. `definition` changes once the peer has been seen (`describe`)."""

    def __init__(self, spec: PeerToolSpec) -> None:
        self.spec = spec
        self.name = tool_name(spec)
        self.card: AgentCard | None = None
        self._definition = self._define(None)
        self._numbers = _CallNumbers()
        self._last_refresh = float("-inf")

    @property
    def definition(self) -> ToolDefinition:
        return self._definition

    def matches(self, card: AgentCard) -> bool:
        if self.spec.capability:
            return self.spec.capability in card.capabilities
        return card.agent == self.spec.agent

    def describe(self, cards: Sequence[AgentCard]) -> bool:
        """Take the description and input schema of the first matching card (one that has a
        description first); False when none matches."""
        matching = [c for c in cards if self.matches(c)]
        if not matching:
            return False
        self.card = next((c for c in matching if c.description), matching[0])
        self._definition = self._define(self.card)
        return True

    async def refresh(
        self, nc: Client, subjects: Subjects, *, timeout: float = DISCOVER_TIMEOUT_S
    ) -> bool:
        """Ask the running instances again; True when the peer answered."""
        self._last_refresh = time.monotonic()
        cards = await describe_agents(
            nc, subjects, timeout=timeout, enough=lambda found: any(map(self.matches, found))
        )
        return self.describe(cards)

    def _define(self, card: AgentCard | None) -> ToolDefinition:
        what = f"capability {self.spec.capability!r}" if self.spec.capability else "this name"
        description = (
            self.spec.description
            or (card.description if card else "")
            or f"Ask another agent (the one with {what}) to do something for you."
        )
        return ToolDefinition(
            name=self.name,
            description=description,
            parameters=(card.input_schema if card and card.input_schema else DEFAULT_INPUT_SCHEMA),
            timeout_s=self.spec.timeout_s,
        )

    async def call(self, arguments: dict[str, Any], ctx: ToolCallContext) -> PeerOutput:
        if self.card is None and ctx.client is not None and self._may_refresh():
            # The peer was not running when the tools started: read its description now,
            # so the next turn's definition is the peer's own.
            await self.refresh(ctx.client.nc, ctx.client.subjects, timeout=REFRESH_TIMEOUT_S)
        task = self._task(arguments, ctx)
        try:
            result = await self._send(task, ctx)
        except ToolFailed:
            raise
        except TaskFailed as exc:
            if not self.spec.durable:
                raise ToolFailed(f"{self.spec.target} failed: {exc.reason}") from None
            raise ToolFailed(await self._durable_failure(task, ctx, exc)) from None
        except ChorusError as exc:
            reason = f"{self.spec.target} did not answer: {exc.code}: {exc.reason}"
            raise ToolFailed(reason) from None
        ctx.answered_by, ctx.usage = result.instance, result.usage  # for the call's record
        return PeerOutput(
            output=result.output,
            data=result.data,
            agent=result.agent,
            instance=result.instance,
            task_id=result.task_id,
        )

    def _may_refresh(self) -> bool:
        return time.monotonic() - self._last_refresh >= REFRESH_EVERY_S

    async def _send(self, task: Task, ctx: ToolCallContext) -> Result:
        spec = self.spec
        if spec.durable:
            if ctx.queue is None:
                raise ToolFailed(
                    f"{self.name} is a durable peer tool and this call has no task queue "
                    "(ToolCallContext.queue); it cannot be sent"
                )
            return await ctx.queue.run(
                task, capability=spec.capability, agent=spec.agent, timeout=spec.timeout_s
            )
        if ctx.client is None:
            raise ToolFailed(
                f"{self.name} has no connection to send on (ToolCallContext.client is unset)"
            )
        return await ctx.client.run_task(
            task,
            capability=spec.capability or None,
            agent=spec.agent or None,
            timeout=spec.timeout_s,
        )

    async def _durable_failure(self, task: Task, ctx: ToolCallContext, exc: TaskFailed) -> str:
        """The failed durable task's last error, code first (`depth_exceeded: ...`)."""
        outcome = await ctx.queue.outcome(task.task_id) if ctx.queue is not None else None
        if outcome is None or not outcome.errors:
            return f"{self.spec.target} failed: {exc.code}: {exc.reason}"
        last = outcome.errors[-1]
        return (
            f"{self.spec.target} failed after {outcome.attempts} attempt(s): "
            f"{last.code}: {last.reason}"
        )

    def _task(self, arguments: dict[str, Any], ctx: ToolCallContext) -> Task:
        text, data = self._input(arguments)
        return Task(
            input=text,
            data=data,
            task_id=self._task_id(ctx),
            capability=self.spec.capability,
            agent=self.spec.agent,
            run_id=ctx.run_id,
            depth=ctx.depth + 1,
        )

    def _input(self, arguments: dict[str, Any]) -> tuple[str, Any]:
        """The Task's input text and data: the `input` string under the default schema; the
        arguments as JSON text and as data under the peer's own schema."""
        if not isinstance(arguments, dict):
            raise ToolFailed(f"{self.name} takes a JSON object, not {type(arguments).__name__}")
        schema = self._definition.parameters
        missing = [k for k in schema.get("required", []) if k not in arguments]
        if missing:
            raise ToolFailed(f"{self.name} needs the argument(s) {', '.join(map(repr, missing))}")
        if schema is DEFAULT_INPUT_SCHEMA:
            text = arguments["input"]
            if not isinstance(text, str) or not text.strip():
                raise ToolFailed(f"{self.name}: `input` must be a non-empty string")
            return text, None
        return json.dumps(arguments, ensure_ascii=False, sort_keys=True), arguments

    def _task_id(self, ctx: ToolCallContext) -> str:
        """`<caller task>-<tool>-<n>` (`-a<attempt>` before `-<n>` after the first attempt, so a
        retried caller that asks something else is not given the old answer)."""
        # Outside a task (a help request, a test) the model's call id, or a fresh id, is used.
        caller = _NOT_TASK_ID.sub("_", ctx.task_id or ctx.call_id) or new_id()
        n = self._numbers.next(caller, ctx.attempt)
        attempt = f"-a{ctx.attempt}" if ctx.attempt > 1 else ""
        suffix = f"-{self.name}{attempt}-{n}"
        if len(caller) + len(suffix) > MAX_TASK_ID:
            caller = hashlib.sha256(caller.encode()).hexdigest()[:32]
        return f"{caller}{suffix}"


def peer_tool(item: PeerToolSpec | dict[str, Any]) -> PeerTool:
    """One peer tool from a spec entry (a PeerToolSpec, or the entry's mapping)."""
    spec = item if isinstance(item, PeerToolSpec) else _convert(item)
    return PeerTool(spec)


def _convert(item: dict[str, Any]) -> PeerToolSpec:
    try:
        return msgspec.convert(item, PeerToolSpec)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"peer tool {item!r}: {exc}") from None


class PeerTools:
    """A ToolSource of peers: builds the tools and describes them from one `$SRV.INFO`
    round (which ends early once every peer has answered)."""

    def __init__(
        self,
        items: Sequence[PeerToolSpec | dict[str, Any]],
        nc: Client,
        subjects: Subjects,
        *,
        discover_timeout: float = DISCOVER_TIMEOUT_S,
    ) -> None:
        self.tools = [peer_tool(item) for item in items]
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"peer tools named twice: {twice}")
        self.nc = nc
        self.subjects = subjects
        self.discover_timeout = discover_timeout

    async def start(self) -> list[PeerTool]:
        if self.tools:
            cards = await describe_agents(
                self.nc,
                self.subjects,
                timeout=self.discover_timeout,
                enough=lambda found: all(any(map(t.matches, found)) for t in self.tools),
            )
            for tool in self.tools:
                tool.describe(cards)
        return list(self.tools)

    async def close(self) -> None:
        """Nothing to close: the tools send on the caller's connection."""
