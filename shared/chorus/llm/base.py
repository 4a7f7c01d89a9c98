"""The one interface every model provider implements.

A request is the agent's instructions, the task's input (the first user message) and the
conversation since (`items`: assistant messages, function calls and their outputs), with the
function tools the model may call and hosted tools (`{"type": "web_search", ...}`) passed to
the provider as they are. A reply is text and/or tool calls, the items it adds to the
conversation, and token usage. `complete(ModelRequest(model, instructions, input))` with no
items nor tools is the single prompt it always was.

`stream(request)` is the same call as it happens: `TextDelta`s as the model writes, then
the `ModelReply` (the whole text again, the tool calls, the usage) last. The agent loop uses
it when someone follows the task's live output; `complete` otherwise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import msgspec

from chorus.errors import ModelError
from chorus.messages import Usage


class ConversationItem(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of what a conversation is made of after the task's input."""


class UserMessage(ConversationItem, frozen=True, tag="user_message"):
    text: str


class AssistantMessage(ConversationItem, frozen=True, tag="assistant_message"):
    text: str


class FunctionCall(ConversationItem, frozen=True, tag="function_call"):
    """The model asks for one tool call; `arguments` is JSON text, as the model wrote it."""

    call_id: str
    name: str
    arguments: str = "{}"


class FunctionCallOutput(ConversationItem, frozen=True, tag="function_call_output"):
    """What a tool call gave back (text; errors as `{"error": "..."}`)."""

    call_id: str
    output: str


class ProviderItem(ConversationItem, frozen=True, tag="provider_item"):
    """An item only its provider understands (an OpenAI reasoning item): sent back to that
    provider as it came, dropped by any other."""

    provider: str
    data: dict[str, Any]


Item = UserMessage | AssistantMessage | FunctionCall | FunctionCallOutput | ProviderItem


class FunctionTool(msgspec.Struct, frozen=True, kw_only=True):
    """A tool the model may call, as the model is told about it."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )


class ModelRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One model call: the agent's instructions, the task's input, optionally a JSON schema,
    the conversation so far and the tools on offer."""

    model: str
    instructions: str
    input: str
    json_schema: dict[str, Any] | None = None
    schema_name: str = "output"
    items: tuple[Item, ...] = ()  # this loop's turns so far, after the input
    tools: tuple[FunctionTool, ...] = ()
    # Earlier turns of the conversation (a session's history), before the input.
    history: tuple[Item, ...] = ()
    hosted_tools: tuple[dict[str, Any], ...] = ()  # provider tools, passed through as given


class ModelReply(msgspec.Struct, frozen=True, kw_only=True):
    """The model's answer. `data` is the parsed JSON when a schema was asked for and the model
    answered (no tool calls). `items` is what this reply adds to the conversation."""

    text: str
    data: Any = None
    usage: Usage = Usage()
    model: str = ""
    tool_calls: tuple[FunctionCall, ...] = ()
    items: tuple[Item, ...] = ()


class TextDelta(msgspec.Struct, frozen=True):
    """Text the model has just written, in order; a stream's deltas add up to its reply's
    text."""

    text: str


ModelEvent = TextDelta | ModelReply
"""What `Model.stream` yields: deltas, then one ModelReply, last."""


class Model(Protocol):
    """A provider. Implementations must be safe to call concurrently from many tasks."""

    name: str

    async def complete(self, request: ModelRequest) -> ModelReply: ...

    def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        """The call of `complete`, as it happens: text deltas, then the reply."""
        ...

    async def close(self) -> None: ...


async def streamed_reply(
    model: Model, request: ModelRequest, on_delta: Callable[[str], None]
) -> ModelReply:
    """`model.stream(request)` with each delta handed to `on_delta`; the reply it ends with."""
    events = model.stream(request)
    reply: ModelReply | None = None
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                if event.text:
                    on_delta(event.text)
            else:
                reply = event
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:  # an abandoned generator closes its HTTP response now
            await close()
    if reply is None:
        raise ModelError(f"model {model.name}: the stream ended without a reply")
    return reply


def runs_hosted_tools(model: Model) -> bool:
    """Whether `model` can run hosted tools: providers say so with `hosted_tools = True`."""
    return bool(getattr(model, "hosted_tools", False))


def reply_items(text: str, calls: tuple[FunctionCall, ...]) -> tuple[Item, ...]:
    """The conversation items of a reply with this text and these calls."""
    message: tuple[Item, ...] = (AssistantMessage(text=text),) if text else ()
    return message + calls
