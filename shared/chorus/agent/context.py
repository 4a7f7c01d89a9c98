"""What a handler can do while it works: ask the model, run the tool loop, ask a peer for
help, emit events, show its live output."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from chorus.agent.loop import LoopResult, LoopStart, run_loop
from chorus.agent.toolbox import Toolbox
from chorus.errors import MaxTurnsExceeded
from chorus.llm.base import FunctionCall, Item, Model, ModelReply, ModelRequest
from chorus.messages import Event, HelpReply, ToolCallRecord, Usage
from chorus.tools.base import Tool, ToolCallContext

if TYPE_CHECKING:
    from chorus.agent.host import AgentHost
    from chorus.agent.streaming import TaskStream
    from chorus.client import ChorusClient, TaskQueue
    from chorus.state import SharedState


class Context:
    """Per task (or event, or help request). Handlers receive one; it is not shared."""

    def __init__(
        self,
        host: AgentHost,
        *,
        run_id: str = "",
        instructions: str = "",
        task_id: str = "",
        attempt: int = 1,
        depth: int = 0,
    ) -> None:
        self._host = host
        self.run_id = run_id
        self.depth = depth  # agents-as-tools hops that led to this task
        self.instructions = instructions
        self.task_id = task_id
        self.attempt = attempt
        self.usage = Usage()
        self.events: list[Event] = []
        self.tool_calls: list[ToolCallRecord] = []  # every loop's, put on the Result
        # The task's identity across its retries, for the effect ledger (see host._run).
        self.effect_scope = task_id
        # A session's earlier turns, given to the model before this task's input.
        self.history: tuple[Item, ...] = ()
        # The task's live output (None for events and help requests): `run_loop` streams
        # the model into it; a handler may add text of its own with `stream.delta(text)`.
        self.stream: TaskStream | None = None
        # The agent's models as this task uses them: charged to its run's budget, and
        # counting what each model used (chorus.llm.limited).
        self.task_model = host.model.for_task(run_id)
        # Tasks may park on tool calls that wait for a person (events and help cannot); a
        # resumed task's first loop goes on from `resume_from` (chorus.agent.approvals).
        self.can_park = False
        self.resume_from: LoopStart | None = None
        self.log = logging.getLogger(f"chorus.agent.{host.agent.name}")

    @property
    def agent_name(self) -> str:
        return self._host.agent.name

    @property
    def instance(self) -> str:
        return self._host.instance

    @property
    def model(self) -> Model:
        """The agent's model for this task (its fallbacks, limits and budgets included)."""
        return self.task_model

    @property
    def own_usage(self) -> Usage:
        """What this task's own model calls used (`usage` also counts delegated work)."""
        return self.task_model.usage

    @property
    def client(self) -> ChorusClient:
        """Request-reply to peers on this instance's connection (peer tools, direct)."""
        return self._host.client

    @property
    def queue(self) -> TaskQueue:
        """Durable tasks to peers on this instance's connection (peer tools, durable)."""
        return self._host.queue

    async def ask_model(
        self,
        input: str,
        *,
        instructions: str | None = None,
        json_schema: dict[str, Any] | None = None,
        schema_name: str = "output",
    ) -> ModelReply:
        """One model call with the agent's model; token usage is added to this task's."""
        request = ModelRequest(
            model=self._host.model_name,
            instructions=self.instructions if instructions is None else instructions,
            input=input,
            json_schema=json_schema,
            schema_name=schema_name,
        )
        reply = await self.task_model.complete(request)
        self.usage = self.usage + reply.usage
        return reply

    async def run_loop(
        self,
        input: str,
        *,
        instructions: str | None = None,
        json_schema: dict[str, Any] | None = None,
        schema_name: str = "output",
        tools: Sequence[Tool] | None = None,
        max_turns: int | None = None,
    ) -> LoopResult:
        """Ask the model, run the tools it calls, and ask again until it answers.

        The tools are the agent's (its spec's `tools:` and `Agent.use`), or `tools` instead.
        Usage and tool-call records are added to this task's; `max_turns` defaults to the
        spec's. Raises MaxTurnsExceeded when the model never gives a final answer.
        """
        spec = self._host.agent.spec
        toolbox = self._host.toolbox if tools is None else Toolbox(tools)
        request = ModelRequest(
            model=self._host.model_name,
            instructions=self.instructions if instructions is None else instructions,
            input=input,
            json_schema=json_schema,
            schema_name=schema_name,
            history=self.history,
        )
        start, self.resume_from = self.resume_from, None
        try:
            result = await run_loop(
                self.task_model,
                request,
                toolbox,
                self._call_context,
                max_turns=max_turns or spec.max_turns,
                max_parallel=spec.max_tool_calls_per_turn,
                sink=self.stream if self.stream is not None and self.stream.enabled else None,
                can_park=self.can_park,
                start=start,
                steer=self._host.run_work.steering(self.run_id),
            )
        except MaxTurnsExceeded as exc:
            self.tool_calls.extend(exc.tool_calls)
            self._host.metrics.tools_done(self.agent_name, exc.tool_calls)
            raise
        self.usage = self.usage + result.usage
        self.tool_calls.extend(result.tool_calls)
        self._host.metrics.tools_done(self.agent_name, result.tool_calls)
        return result

    def _call_context(self, call: FunctionCall) -> ToolCallContext:
        return self.tool_context(call.call_id)

    def tool_context(self, call_id: str = "") -> ToolCallContext:
        """The context a tool call of this task gets."""
        return ToolCallContext(
            agent=self.agent_name,
            instance=self.instance,
            task_id=self.task_id,
            run_id=self.run_id,
            attempt=self.attempt,
            call_id=call_id,
            depth=self.depth,
            client=self._host.client,
            queue=self._host.queue,
            effect_scope=self.effect_scope,
        )

    async def ask_help(
        self, capability: str, question: str, *, data: Any = None, timeout: float | None = None
    ) -> HelpReply:
        """Ask any agent with `capability`; raises NoHelper when none is running."""
        reply = await self._host.client.ask_help(
            capability,
            question,
            data=data,
            requester=self.instance,
            run_id=self.run_id,
            timeout=timeout,
        )
        self.usage = self.usage + reply.usage
        return reply

    async def state(self) -> SharedState:
        """The shared state (KV), opened on first use; this instance is the writer."""
        return await self._host.shared_state()

    def emit(self, topic: str, data: Any = None) -> Event:
        """Publish an event when the handler returns (a next action for other agents)."""
        event = Event(topic=topic, data=data, source=self.agent_name, run_id=self.run_id)
        self.events.append(event)
        return event
