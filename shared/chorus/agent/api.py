"""Writing an agent in Python: an `Agent` with decorated handlers.

    agent = Agent(name="researcher", capabilities=["research"], instructions="Research it.")

    @agent.on_task
    async def research(task: Task, ctx: Context) -> str:
        reply = await ctx.ask_model(task.input)
        return reply.text

    @tool
    async def define(term: str) -> str:
        "Look a term up in the glossary."

    agent.use(define)  # offered to the model, with the spec's `tools:`

Handlers not given fall back to the default: the agent loop with the agent's model, its
instructions and its tools (`ctx.run_loop`).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from chorus.agent.context import Context
from chorus.errors import ConfigError
from chorus.messages import Event, HelpRequest, Task
from chorus.specs.agent import AgentSpec

if TYPE_CHECKING:
    from chorus.tools.base import Tool


class Reply(msgspec.Struct, kw_only=True):
    """What a handler may return instead of a plain string: text and/or structured data."""

    output: str = ""
    data: Any = None


TaskHandler = Callable[[Task, Context], Awaitable[str | Reply | Any]]
EventHandler = Callable[[Event, Context], Awaitable[str | Reply | Any | None]]
HelpHandler = Callable[[HelpRequest, Context], Awaitable[str | Reply | Any]]


class Agent:
    """An agent definition: its spec plus optional Python handlers."""

    def __init__(self, spec: AgentSpec | None = None, **fields: Any) -> None:
        self.spec = spec if spec is not None else AgentSpec(**fields)
        self._task: TaskHandler | None = None
        self._event: EventHandler | None = None
        self._help: HelpHandler | None = None
        self.tools: list[Tool] = []  # besides the spec's `tools:`

    def use(self, *tools: Tool) -> Agent:
        """Offer these tools (Python `@tool`s, any `Tool`) to the model, with the spec's."""
        self.tools.extend(tools)
        return self

    @property
    def name(self) -> str:
        return self.spec.name

    def on_task(self, handler: TaskHandler) -> TaskHandler:
        self._task = handler
        return handler

    def on_event(self, handler: EventHandler) -> EventHandler:
        self._event = handler
        return handler

    def on_help(self, handler: HelpHandler) -> HelpHandler:
        self._help = handler
        return handler

    async def handle_task(self, task: Task, ctx: Context) -> Reply:
        if self._task is not None:
            return as_reply(await self._task(task, ctx))
        return await default_answer(ctx, task.input, task.instructions, task.json_schema)

    async def handle_event(self, event: Event, ctx: Context) -> Reply | None:
        if self._event is not None:
            answer = await self._event(event, ctx)
            return None if answer is None else as_reply(answer)
        text = event.data if isinstance(event.data, str) else json.dumps(event.data)
        reply = await default_answer(ctx, f"event {event.topic}: {text}", "", None)
        if self.spec.emits:
            ctx.emit(self.spec.emits, reply.data if reply.data is not None else reply.output)
        return reply

    async def handle_help(self, request: HelpRequest, ctx: Context) -> Reply:
        if self._help is not None:
            return as_reply(await self._help(request, ctx))
        return await default_answer(ctx, request.question, "", None)


async def default_answer(
    ctx: Context, text: str, extra_instructions: str, json_schema: dict[str, Any] | None
) -> Reply:
    instructions = "\n\n".join(p for p in (ctx.instructions, extra_instructions) if p)
    reply = await ctx.run_loop(text, instructions=instructions, json_schema=json_schema)
    return Reply(output=reply.text, data=reply.data)


def as_reply(answer: Any) -> Reply:
    if isinstance(answer, Reply):
        return answer
    if isinstance(answer, str):
        return Reply(output=answer)
    data = msgspec.to_builtins(answer)
    return Reply(output=json.dumps(data), data=data)


def load_handler(reference: str, spec: AgentSpec | None) -> Agent:
    """Resolve `module:attribute` to an Agent; a bare function becomes the spec's task handler."""
    module_name, _, attribute = reference.partition(":")
    if not attribute:
        raise ConfigError(f"handler {reference!r} must look like package.module:attribute")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load handler {reference!r}: {exc}") from None
    if isinstance(target, Agent):
        if spec is not None:
            target.spec = spec
        return target
    if callable(target) and spec is not None:
        agent = Agent(spec)
        agent.on_task(target)
        return agent
    raise ConfigError(
        f"{reference!r} must be an Agent, or a function named as `handler:` in a YAML spec"
    )


def agent_from_spec(spec: AgentSpec) -> Agent:
    return load_handler(spec.handler, spec) if spec.handler else Agent(spec)
