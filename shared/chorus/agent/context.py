"""What a handler can do while it works: ask the model, ask a peer for help, emit events."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from chorus.llm.base import Model, ModelReply, ModelRequest
from chorus.messages import Event, HelpReply, Usage

if TYPE_CHECKING:
    from chorus.agent.host import AgentHost
    from chorus.client import ChorusClient, TaskQueue
    from chorus.state import SharedState


class Context:
    """Per task (or event, or help request). Handlers receive one; it is not shared."""

    def __init__(
        self, host: AgentHost, *, run_id: str = "", instructions: str = "", depth: int = 0
    ) -> None:
        self._host = host
        self.run_id = run_id
        self.depth = depth  # agents-as-tools hops that led to this task
        self.instructions = instructions
        self.usage = Usage()
        self.events: list[Event] = []
        self.log = logging.getLogger(f"chorus.agent.{host.agent.name}")

    @property
    def agent_name(self) -> str:
        return self._host.agent.name

    @property
    def instance(self) -> str:
        return self._host.instance

    @property
    def model(self) -> Model:
        return self._host.model

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
        reply = await self._host.model.complete(request)
        self.usage = self.usage + reply.usage
        return reply

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
