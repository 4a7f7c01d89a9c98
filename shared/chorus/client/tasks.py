"""Talking to agents from any process: tasks, help requests, events, live output, discovery."""

from __future__ import annotations

import json
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from chorus.client.streams import DEFAULT_MAX_AGE_S, ChunkReader
from chorus.errors import NoHelper, NoResponders, RequestTimeout, error_from_code
from chorus.messages import (
    ErrorReply,
    Event,
    HelpReply,
    HelpRequest,
    Result,
    Task,
    decode_help,
    decode_result,
    encode,
    headers,
)
from chorus.nats import wire
from chorus.nats.streams import ensure_events_stream, ensure_or_await
from chorus.subjects import Subjects
from chorus.telemetry import tracing


class ChorusClient:
    """A thin typed layer over one NATS connection."""

    def __init__(self, nc: Client, subjects: Subjects, *, timeout: float = 60.0) -> None:
        self.nc = nc
        self.subjects = subjects
        self.timeout = timeout
        self._events_ready = False

    async def _request(
        self, subject: str, payload: bytes, sent: headers.Headers, timeout: float | None
    ) -> Msg:
        try:
            return await wire.request(
                self.nc, subject, payload, sent, timeout=timeout or self.timeout
            )
        except NoRespondersError:
            raise NoResponders(f"no agent is listening on {subject}") from None
        except NatsTimeout:
            raise RequestTimeout(
                f"no reply on {subject} within {timeout or self.timeout}s"
            ) from None

    async def run_task(
        self,
        task: Task,
        *,
        instance: str | None = None,
        capability: str | None = None,
        agent: str | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Send a task to one instance, to any instance with a capability, or to any instance
        of the agent called `agent`; wait for its result."""
        if sum(target is not None for target in (instance, capability, agent)) != 1:
            raise ValueError("give exactly one of instance, capability or agent")
        if instance is not None:
            subject = self.subjects.agent_task(instance)
        elif agent is not None:
            subject = self.subjects.named_task(agent)
        else:
            subject = self.subjects.capability_task(capability or "")
        try:
            msg = await self._request(subject, encode(task), headers.for_task(task), timeout)
        except NoResponders:
            if instance is not None:
                raise
            target = f"named {agent!r}" if agent is not None else f"with capability {capability!r}"
            raise NoResponders(
                f"no agent {target} is running; start one (chorus agent run SPEC)"
            ) from None
        reply = decode_result(msg.data)
        if isinstance(reply, ErrorReply):
            raise error_from_code(reply.code, reply.reason)
        return reply

    async def ask_help(
        self,
        capability: str,
        question: str,
        *,
        data: Any = None,
        requester: str = "",
        run_id: str = "",
        timeout: float | None = None,
    ) -> HelpReply:
        request = HelpRequest(
            capability=capability,
            question=question,
            data=data,
            requester=requester,
            run_id=run_id,
        )
        try:
            msg = await self._request(self.subjects.help(capability), encode(request), {}, timeout)
        except NoResponders:
            raise NoHelper(
                f"no agent with capability {capability!r} is running to help; start one "
                f"(chorus agent run SPEC) or ask for another capability"
            ) from None
        reply = decode_help(msg.data)
        if isinstance(reply, ErrorReply):
            raise error_from_code(reply.code, reply.reason)
        return reply

    async def publish_event(self, event: Event) -> bool:
        """Store an event in the events stream; returns False when it was a duplicate id."""
        js = self.nc.jetstream()
        if not self._events_ready:
            # Agent credentials may read the events stream but not create it (the services do).
            await ensure_or_await(
                js, self.subjects.events_stream, lambda: ensure_events_stream(js, self.subjects)
            )
            self._events_ready = True
        subject = self.subjects.event(event.topic)
        with tracing.sending(subject, message_id=event.event_id):
            ack = await wire.publish_durably(js, subject, encode(event), headers.for_event(event))
        return not ack.duplicate

    def stream(
        self,
        run_id: str,
        task_id: str | None = None,
        *,
        from_seq: int = 0,
        max_age_s: float = DEFAULT_MAX_AGE_S,
    ) -> ChunkReader:
        """The live output of a run's tasks (or of one: a workflow step's name, else the
        task's id; `run_id` "" for a task of no run), in order, from stream sequence
        `from_seq` (0: all that is kept; `chunk.stream_seq + 1` resumes after a chunk).

            async with client.stream(run_id) as chunks:
                async for chunk in chunks:
                    print(chunk.kind, chunk.text)
        """
        return ChunkReader(
            self.nc, self.subjects, run_id, task_id, from_seq=from_seq, max_age_s=max_age_s
        )

    async def discover(self, timeout: float = 0.5) -> list[dict[str, Any]]:
        """Every agent instance that answers `$SRV.PING.<service>` within `timeout`."""
        replies = await wire.gather(self.nc, self.subjects.micro_ping, timeout=timeout)
        found = [json.loads(msg.data) for msg in replies]
        return found
