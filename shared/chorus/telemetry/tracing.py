"""Chorus's spans, named and attributed after the OpenTelemetry semantic conventions.

Messaging (NATS): `send <subject>` (PRODUCER) where a message is stored for later, `process
<subject>` (CONSUMER) where a stored one is worked on, each with `messaging.system=nats`,
`messaging.destination.name` and `messaging.operation.type` (`send`, the current name of what
older conventions called `publish`, or `process`). Generative AI: `invoke_agent <agent>`
where an agent instance handles a task, a help request or an event, `chat <model>` per model
call with its token usage, `execute_tool <tool>` per tool call, `invoke_workflow <workflow>`
for a run, whose span carries the run's token total.

Only the OpenTelemetry API is used: with no SDK configured (`chorus.telemetry.setup`) every
span is a no-op that costs next to nothing. Trace context crosses processes in NATS headers
(`chorus.nats.propagation`); `parent_of` reads it back from a received message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, Final, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from chorus import __version__
from chorus.messages import Usage
from chorus.nats import propagation

T = TypeVar("T")
Attributes = dict[str, AttributeValue]

TRACER: Final = "chorus"

# Semantic-convention attribute keys, spelled here and nowhere else.
MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_DESTINATION: Final = "messaging.destination.name"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
MESSAGING_MESSAGE_ID: Final = "messaging.message.id"
MESSAGING_CONSUMER_GROUP: Final = "messaging.consumer.group.name"
MESSAGING_DELIVERY_COUNT: Final = "messaging.message.delivery_count"
GEN_AI_OPERATION: Final = "gen_ai.operation.name"
GEN_AI_PROVIDER: Final = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_AGENT_NAME: Final = "gen_ai.agent.name"
GEN_AI_AGENT_ID: Final = "gen_ai.agent.id"
GEN_AI_TOOL_NAME: Final = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID: Final = "gen_ai.tool.call.id"
GEN_AI_TOOL_TYPE: Final = "gen_ai.tool.type"
GEN_AI_WORKFLOW_NAME: Final = "gen_ai.workflow.name"
ERROR_TYPE: Final = "error.type"
# Chorus's own, under its namespace.
RUN_ID: Final = "chorus.run.id"
STEP: Final = "chorus.step"
TASK_ID: Final = "chorus.task.id"
ATTEMPT: Final = "chorus.attempt"
RESUMED: Final = "chorus.run.resumed"
TOTAL_TOKENS: Final = "chorus.usage.total_tokens"


def tracer() -> trace.Tracer:
    """Chorus's tracer (a proxy until a provider is set, so it may be taken early)."""
    return trace.get_tracer(TRACER, __version__)


def parent_of(headers: Mapping[str, str] | None) -> Context:
    """The context a received message's headers carry, to parent the span that handles it."""
    return propagation.extract(headers)


def messaging(
    subject: str, operation: str, *, message_id: str = "", group: str = "", delivery: int = 0
) -> Attributes:
    """The messaging attributes of one NATS operation (`send`, `receive` or `process`)."""
    attributes: Attributes = {
        MESSAGING_SYSTEM: "nats",
        MESSAGING_DESTINATION: subject,
        MESSAGING_OPERATION_TYPE: operation,
    }
    if message_id:
        attributes[MESSAGING_MESSAGE_ID] = message_id
    if group:
        attributes[MESSAGING_CONSUMER_GROUP] = group
    if delivery:
        attributes[MESSAGING_DELIVERY_COUNT] = delivery
    return attributes


@contextlib.contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: Context | None = None,
    attributes: Attributes | None = None,
    links: Sequence[Link] = (),
) -> Iterator[Span]:
    """A span made current for the block; an exception escaping it marks it failed."""
    with tracer().start_as_current_span(
        name, context=parent, kind=kind, attributes=attributes, links=links
    ) as current:
        yield current


async def within(
    work: Awaitable[T],
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: Context | None = None,
    attributes: Attributes | None = None,
) -> T:
    """Await `work` inside a span: a coroutine given here runs with that span current, so a
    task can be started traced in one line (`create_task(within(handle(msg), ...))`)."""
    try:
        with span(name, kind=kind, parent=parent, attributes=attributes):
            return await work
    finally:
        if isinstance(work, Coroutine):
            work.close()  # a no-op once it ran; silences "never awaited" if cancelled first


def sending(
    subject: str, *, message_id: str = "", name: str = ""
) -> contextlib.AbstractContextManager[Span]:
    """A PRODUCER span around storing a message that someone will process later; the message
    carries this span's context (wire.outgoing adds it)."""
    return span(
        name or f"send {subject}",
        kind=SpanKind.PRODUCER,
        attributes=messaging(subject, "send", message_id=message_id),
    )


def invoke_agent(
    work: Awaitable[T],
    *,
    agent: str,
    instance: str,
    subject: str,
    headers: Mapping[str, str] | None,
    task_id: str = "",
    run_id: str = "",
    kind: SpanKind = SpanKind.SERVER,
    delivery: int = 0,
) -> Coroutine[Any, Any, T]:
    """`work` (an instance handling one message) as `invoke_agent <agent>`, a child of the
    sender's span. SERVER for a request, CONSUMER for an event taken from the stream."""
    attributes = messaging(subject, "process", message_id=task_id, delivery=delivery)
    attributes.update({GEN_AI_OPERATION: "invoke_agent", GEN_AI_AGENT_NAME: agent})
    attributes[GEN_AI_AGENT_ID] = instance
    if task_id:
        attributes[TASK_ID] = task_id
    if run_id:
        attributes[RUN_ID] = run_id
    return within(
        work, f"invoke_agent {agent}", kind=kind, parent=parent_of(headers), attributes=attributes
    )


def model_call(provider: str, model: str) -> contextlib.AbstractContextManager[Span]:
    """A CLIENT span around one model call: `chat <model>`."""
    return span(
        f"chat {model}",
        kind=SpanKind.CLIENT,
        attributes={
            GEN_AI_OPERATION: "chat",
            GEN_AI_PROVIDER: provider,
            GEN_AI_REQUEST_MODEL: model,
        },
    )


def tool_call(name: str, call_id: str) -> contextlib.AbstractContextManager[Span]:
    """An INTERNAL span around one tool call the model asked for: `execute_tool <tool>`."""
    return span(
        f"execute_tool {name}",
        attributes={
            GEN_AI_OPERATION: "execute_tool",
            GEN_AI_TOOL_NAME: name,
            GEN_AI_TOOL_CALL_ID: call_id,
            GEN_AI_TOOL_TYPE: "function",
        },
    )


def record_usage(target: Span | None, usage: Usage, *, model: str = "") -> None:
    """Token usage on a span (the current one when `target` is None)."""
    current = target if target is not None else trace.get_current_span()
    if not current.is_recording():
        return
    current.set_attribute(GEN_AI_INPUT_TOKENS, usage.input_tokens)
    current.set_attribute(GEN_AI_OUTPUT_TOKENS, usage.output_tokens)
    current.set_attribute(TOTAL_TOKENS, usage.total_tokens)
    if model:
        current.set_attribute(GEN_AI_RESPONSE_MODEL, model)


def mark_failed(code: str, reason: str, target: Span | None = None) -> None:
    """Mark a span (the current one when `target` is None) as failed with Chorus's error code,
    for failures that are answered rather than raised."""
    current = target if target is not None else trace.get_current_span()
    if current.is_recording():
        current.set_attribute(ERROR_TYPE, code)
        current.set_status(Status(StatusCode.ERROR, reason[:500]))


def link_to(traceparent: str) -> list[Link]:
    """A link to the span a stored `traceparent` names (an earlier attempt's); [] for none."""
    context = propagation.from_traceparent(traceparent)
    span_context = trace.get_current_span(context).get_span_context()
    return [Link(span_context)] if span_context.is_valid else []
