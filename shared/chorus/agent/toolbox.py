"""An agent's tools, built from its spec's `tools:` entries, started and closed with the host.

Each entry kind maps to a builder in `BUILDERS` (one line per kind): a builder returns tools,
or a `ToolSource` that gives its tools when started. Hosted tools are not built: they go to
the model as they are, and a model that cannot run them is a ConfigError at start.
Peer tools (`capability`, `agent`) come from `chorus.tools.peers` and MCP servers from
`chorus.tools.mcp` when those modules are part of the build.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from chorus.errors import ConfigError
from chorus.llm.base import FunctionTool, Model, runs_hosted_tools
from chorus.specs.agent import AgentSpec
from chorus.specs.tools import ApprovalPolicy, ToolEntry, ToolKind, ToolSpec, kind_of
from chorus.tools.ask_help import AskHelpTool
from chorus.tools.base import Tool, ToolCallContext, ToolDefinition, ToolSource
from chorus.tools.ledger import EffectLedger
from chorus.tools.python import load_python_tool

if TYPE_CHECKING:
    from chorus.agent.host import AgentHost

Built = Sequence[Tool] | ToolSource
Builder = Callable[[ToolEntry, "AgentHost | None"], Built]


def _ask_help(entry: ToolEntry, host: AgentHost | None) -> Built:
    return [AskHelpTool()]


def _python(entry: ToolEntry, host: AgentHost | None) -> Built:
    assert isinstance(entry, ToolSpec) and entry.python is not None
    return [load_python_tool(entry.python)]


def _optional_module(name: str, kind: str) -> Any:
    if importlib.util.find_spec(name) is None:
        raise ConfigError(f"{kind} tools are not available in this build (no module {name})")
    return importlib.import_module(name)


def _peer(entry: ToolEntry, host: AgentHost | None) -> Built:
    assert isinstance(entry, ToolSpec)
    peers = _optional_module("chorus.tools.peers", "capability and agent")
    item = {
        "capability": entry.capability or "",
        "agent": entry.agent or "",
        "durable": entry.durable,
        "description": entry.description,
    }
    peers.peer_tool(item)  # a wrong entry fails here, before anything starts
    return _PeersOf(host, item)


class _PeersOf:
    """Peer tools described from `$SRV.INFO` once the host is connected."""

    def __init__(self, host: AgentHost | None, item: dict[str, Any]) -> None:
        self.host = host
        self.item = item

    async def start(self) -> Sequence[Tool]:
        from chorus.tools.peers import PeerTools, peer_tool

        if self.host is None:  # no connection to read descriptions on: the entry's own
            return [peer_tool(self.item)]
        return await PeerTools([self.item], self.host.nc, self.host.subjects).start()

    async def close(self) -> None:
        """Nothing to close: the tools send on the caller's connection."""


def _mcp(entry: ToolEntry, host: AgentHost | None) -> Built:
    assert isinstance(entry, ToolSpec) and entry.mcp is not None
    mcp = _optional_module("chorus.tools.mcp", "mcp")
    server = entry.mcp
    config: dict[str, Any] = {"prefix": entry.prefix}
    if server.command is not None:
        config.update(command=server.command, args=server.args, env=server.env)
    else:
        config.update(url=server.url or "", headers=server.headers)
    source: ToolSource = mcp.McpSource(config)
    return source


BUILDERS: dict[ToolKind, Builder] = {
    "ask_help": _ask_help,
    "python": _python,
    "capability": _peer,
    "agent": _peer,
    "mcp": _mcp,
}


class Toolbox:
    """The tools an agent's loop may call, by name, and the hosted tools for its model."""

    def __init__(
        self,
        tools: Sequence[Tool] = (),
        *,
        sources: Sequence[ToolSource] = (),
        hosted: Sequence[dict[str, Any]] = (),
    ) -> None:
        self._given = list(tools)
        self._sources = list(sources)
        self.hosted: tuple[dict[str, Any], ...] = tuple(hosted)
        self.tools: dict[str, Tool] = {}
        self.definitions: tuple[FunctionTool, ...] = ()
        self._started = not self._sources
        self._index(self._given)

    def _index(self, tools: Sequence[Tool]) -> None:
        by_name: dict[str, Tool] = {}
        for tool in tools:
            name = tool.definition.name
            if name in by_name:
                raise ConfigError(
                    f"two tools are named {name!r}: rename one (an mcp `prefix`, `@tool(name=...)`)"
                )
            by_name[name] = tool
        self.tools = by_name
        self.definitions = tuple(
            FunctionTool(
                name=t.definition.name,
                description=t.definition.description,
                parameters=t.definition.parameters,
            )
            for t in tools
        )

    def __bool__(self) -> bool:
        return bool(self.tools or self.hosted)

    async def start(self, model: Model | None = None, ledger: EffectLedger | None = None) -> None:
        """Start the sources and check that `model` can run the hosted tools; with a
        `ledger`, tools with side effects go through it (never silently repeated)."""
        self.check(model)
        if self._started and ledger is None:
            return
        found = list(self._given)
        for source in self._sources:
            found.extend(await source.start())
        self._started = True
        self._index([ledger.wrap(t) for t in found] if ledger is not None else found)

    def check(self, model: Model | None) -> None:
        """ConfigError when `model` cannot run the hosted tools."""
        if self.hosted and model is not None and not runs_hosted_tools(model):
            kinds = ", ".join(str(t.get("type")) for t in self.hosted)
            raise ConfigError(
                f"hosted tools ({kinds}) need a provider that runs them (openai with the "
                f"Responses API); model {model.name!r} cannot"
            )

    async def close(self) -> None:
        for source in self._sources:
            await source.close()


class Gated:
    """A tool whose calls wait for a person's decision (its definition carries the policy)."""

    def __init__(self, tool: Tool, policy: ApprovalPolicy) -> None:
        self.tool = tool
        self._definition = msgspec.structs.replace(tool.definition, approval=policy)

    @property
    def definition(self) -> ToolDefinition:
        return self._definition

    async def call(self, arguments: dict[str, Any], ctx: ToolCallContext) -> Any:
        return await self.tool.call(arguments, ctx)


class _GatedSource:
    def __init__(self, source: ToolSource, policy: ApprovalPolicy) -> None:
        self.source = source
        self.policy = policy

    async def start(self) -> Sequence[Tool]:
        return [Gated(t, self.policy) for t in await self.source.start()]

    async def close(self) -> None:
        await self.source.close()


def _gated(built: Built, policy: ApprovalPolicy) -> Built:
    if isinstance(built, Sequence):
        return [Gated(t, policy) for t in built]
    return _GatedSource(built, policy)


def build_toolbox(
    spec: AgentSpec, host: AgentHost | None = None, extra: Sequence[Tool] = ()
) -> Toolbox:
    """The toolbox of `spec`'s `tools:` entries, plus `extra` tools given in Python."""
    tools: list[Tool] = list(extra)
    sources: list[ToolSource] = []
    hosted: list[dict[str, Any]] = []
    for entry in spec.tools:
        kind = kind_of(entry)
        if kind == "hosted":
            assert isinstance(entry, ToolSpec)
            hosted.append(entry.hosted_tool)
            continue
        built = BUILDERS[kind](entry, host)
        policy = entry.approval_policy if isinstance(entry, ToolSpec) else None
        if policy is not None:
            built = _gated(built, policy)
        if isinstance(built, Sequence):
            tools.extend(built)
        else:
            sources.append(built)
    return Toolbox(tools, sources=sources, hosted=hosted)
