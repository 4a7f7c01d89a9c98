"""An agent instance, observed: its model calls as `chat` spans and metrics, and each message
it handles as an `invoke_agent` span, a child of the sender's span (from the message headers).

Kept out of the host and the loop, which call in with one line each.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg
from nats.micro.request import Request
from opentelemetry.trace import SpanKind

from chorus.llm.base import Model, ModelEvent, ModelReply, ModelRequest, TextDelta
from chorus.llm.factory import split_model
from chorus.messages import headers as message_headers
from chorus.telemetry import tracing
from chorus.telemetry.metrics import AgentInstruments

if TYPE_CHECKING:
    from chorus.agent.host import AgentHost


class ObservedModel:
    """`model`, with every `complete` and `stream` call traced (`chat <model>`, its usage) and
    measured (duration, time to first token, tokens by agent and model)."""

    def __init__(self, model: Model, metrics: AgentInstruments, agent: str, spec_model: str):
        self.model = model
        self.name = model.name
        self.metrics = metrics
        self.agent = agent
        self.provider = split_model(spec_model)[0]

    async def complete(self, request: ModelRequest) -> ModelReply:
        started = time.perf_counter()
        with tracing.model_call(self.provider, request.model) as span:
            try:
                reply = await self.model.complete(request)
            except BaseException:
                self.metrics.model_done(self.agent, request.model, time.perf_counter() - started)
                raise
            tracing.record_usage(span, reply.usage, model=reply.model)
        self.metrics.model_done(
            self.agent, request.model, time.perf_counter() - started, reply.usage
        )
        return reply

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        """`model.stream`, traced and measured like `complete`, plus time to first token."""
        started = time.perf_counter()
        first = True
        with tracing.model_call(self.provider, request.model) as span:
            try:
                async for event in self.model.stream(request):
                    if isinstance(event, TextDelta) and first:
                        first = False
                        elapsed = time.perf_counter() - started
                        self.metrics.first_token(self.agent, request.model, elapsed)
                    if isinstance(event, ModelReply):
                        tracing.record_usage(span, event.usage, model=event.model)
                        self.metrics.model_done(
                            self.agent, request.model, time.perf_counter() - started, event.usage
                        )
                    yield event
            except BaseException:
                self.metrics.model_done(self.agent, request.model, time.perf_counter() - started)
                raise

    async def close(self) -> None:
        await self.model.close()

    def __getattr__(self, name: str) -> Any:
        # What providers add beyond the protocol (`hosted_tools`, ...) stays readable.
        if name == "model":  # not set yet (a copy made without __init__): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)


def handling(
    work: Coroutine[Any, Any, None],
    message: Request | Msg,
    host: AgentHost,
    *,
    event: bool = False,
) -> Coroutine[Any, Any, None]:
    """`work` (`host` handling one task, help request or event) as `invoke_agent <agent>`,
    a child of the span that sent `message`."""
    received = message_headers.read(message.headers)
    return tracing.invoke_agent(
        work,
        agent=host.agent.name,
        instance=host.instance,
        subject=message.subject,
        headers=message.headers,
        task_id=received.task_id or received.msg_id,
        run_id=received.run_id,
        kind=SpanKind.CONSUMER if event else SpanKind.SERVER,
    )
