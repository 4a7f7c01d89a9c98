"""Reading OpenAI streams (`stream=True`) into text deltas and one final answer.

The Responses API sends typed events: `response.output_text.delta` carries text, and
`response.completed` the whole response (output items, function calls, usage), which is
read as a non-streamed response is. `response.failed`, `response.incomplete` and `error`
end the call with a ModelError.

Chat Completions sends chunks: `choices[0].delta.content` is text, `delta.tool_calls` are
fragments of the calls by `index` (the id and name once, the arguments in pieces), and with
`stream_options={"include_usage": True}` a last chunk with no choices carries the usage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent

from chorus.errors import ModelError
from chorus.llm.base import FunctionCall
from chorus.messages import Usage


def chat_usage(u: CompletionUsage | None) -> Usage:
    """A chat completion's usage, prompt-cache hits (priced lower) included."""
    if u is None:
        return Usage()
    details = u.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details is not None else 0
    return Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens, cached_tokens=cached)


def response_event(event: ResponseStreamEvent, model: str) -> str | Response | None:
    """A Responses stream event as text written, the completed response, or None (an event
    that says nothing the answer needs); raises ModelError when the response failed."""
    if event.type == "response.output_text.delta":
        return event.delta
    if event.type == "response.completed":
        return event.response
    if event.type in ("response.failed", "response.incomplete"):
        response = event.response
        reason = (
            response.error.message
            if response.error is not None
            else (response.incomplete_details.reason if response.incomplete_details else None)
        )
        raise ModelError(f"openai model {model}: the response {event.type[9:]}: {reason}")
    if event.type == "error":
        raise ModelError(f"openai model {model}: stream error {event.code}: {event.message}")
    return None


@dataclass
class _CallParts:
    call_id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class ChatStream:
    """Chat Completions chunks added up: `add` returns each chunk's text, `calls` and
    `usage` are what the whole stream said, `finished` whether the choice said it ended (a
    connection that closes early looks like the end of the stream otherwise)."""

    model: str = ""
    finished: bool = False
    text: list[str] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    _calls: dict[int, _CallParts] = field(default_factory=dict)

    def add(self, chunk: ChatCompletionChunk) -> str:
        self.model = chunk.model or self.model
        if chunk.usage is not None:
            self.usage = chat_usage(chunk.usage)
        if not chunk.choices:
            return ""
        choice = chunk.choices[0]
        self.finished = self.finished or choice.finish_reason is not None
        delta = choice.delta
        for fragment in delta.tool_calls or ():
            parts = self._calls.setdefault(fragment.index, _CallParts())
            parts.call_id = fragment.id or parts.call_id
            if fragment.function is not None:
                parts.name = fragment.function.name or parts.name
                parts.arguments.append(fragment.function.arguments or "")
        if delta.content:
            self.text.append(delta.content)
            return delta.content
        return ""

    @property
    def calls(self) -> tuple[FunctionCall, ...]:
        return tuple(
            FunctionCall(
                call_id=parts.call_id, name=parts.name, arguments="".join(parts.arguments) or "{}"
            )
            for _, parts in sorted(self._calls.items())
        )
