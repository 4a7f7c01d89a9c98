"""The agent host: runs one instance of an agent on a NATS connection.

It serves tasks sent to the instance and to each capability (queue groups share the work
between replicas), help requests, and the events the agent subscribes to (one durable
consumer per agent name, so replicas see each event once). It never runs more than
`max_concurrency` handlers at once, publishes heartbeats, and drains on stop.

Every heartbeat lists the tasks the instance holds, from the moment one arrives until its
reply is sent: that is how a dispatcher learns, in a heartbeat interval, of a task that
never arrived or whose reply was lost (chorus.coordinator.dispatch).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service

from chorus import __version__
from chorus.agent.api import Agent, Reply
from chorus.agent.approvals import Waiting, park, resume_start
from chorus.agent.context import Context
from chorus.agent.conversation import in_session
from chorus.agent.loop import Parked
from chorus.agent.observed import ObservedModel, handling
from chorus.agent.run_control import RunWork
from chorus.agent.sessions import SessionStore
from chorus.agent.spending import agent_model, attach_spend
from chorus.agent.streaming import TaskStreams
from chorus.agent.toolbox import build_toolbox
from chorus.client import ChorusClient, TaskQueue
from chorus.client.approvals import ApprovalBook
from chorus.config import Settings
from chorus.errors import (
    ChorusError,
    ConfigError,
    DepthExceeded,
    Draining,
    InvalidMessage,
    MaxTurnsExceeded,
    PayloadTooLarge,
    TaskFailed,
)
from chorus.llm import Model
from chorus.llm.base import Item
from chorus.llm.factory import split_model
from chorus.llm.limited import LimitedModel
from chorus.messages import (
    ErrorReply,
    Event,
    Heartbeat,
    HelpReply,
    HelpRequest,
    InstanceState,
    Result,
    Task,
    ToolCallRecord,
    Usage,
    decode,
    encode,
    headers,
)
from chorus.messages.agents import MAX_LISTED_TASKS
from chorus.nats import wire
from chorus.nats.connection import ClosedHandler, connect
from chorus.nats.jetstream import ClaimKeeper, DurableConsumer, backoff
from chorus.nats.streams import ensure_events_stream, ensure_or_await
from chorus.specs.agent import SessionSpec
from chorus.subjects import check_token
from chorus.telemetry import tracing
from chorus.telemetry.metrics import AgentInstruments
from chorus.tools.ledger import EffectLedger

if TYPE_CHECKING:
    from chorus.state import SharedState

log = logging.getLogger("chorus.agent")

EVENT_ACK_WAIT_S = 30.0
EVENT_MAX_DELIVER = 5


class InstanceStats(msgspec.Struct):
    """Counters an instance reports in its heartbeats."""

    processed: int = 0
    failed: int = 0
    in_flight: int = 0
    waiting: int = 0
    peak_in_flight: int = 0
    total_latency_ms: float = 0.0
    usage: Usage = Usage()  # tokens (and dollars) of every model call this instance made

    @property
    def mean_latency_ms(self) -> float:
        done = self.processed + self.failed
        return self.total_latency_ms / done if done else 0.0


def new_instance_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}"


def check_instance_id(instance: str, name: str) -> str:
    """Instance ids are `<name>-<suffix>`: subjects and credentials are scoped by the name."""
    suffix = instance[len(name) + 1 :]
    if not instance.startswith(f"{name}-") or not suffix or "-" in suffix:
        raise ConfigError(
            f"instance id {instance!r} must be {name!r}, '-' and a suffix without '-' "
            f"(for example {new_instance_id(name)!r})"
        )
    check_token(instance, "instance id")
    return instance


def peer_metadata(description: str, input_schema: dict[str, Any] | None) -> dict[str, str]:
    """What the `$SRV.INFO` metadata tells agents that call this one as a tool."""
    metadata = {"description": description}
    if input_schema is not None:
        metadata["input_schema"] = json.dumps(input_schema, separators=(",", ":"))
    return metadata


class AgentHost:
    """One running instance of `agent`."""

    def __init__(
        self,
        agent: Agent,
        settings: Settings,
        *,
        model: Model | None = None,
        instance: str | None = None,
        nc: Client | None = None,
        on_closed: ClosedHandler | None = None,
    ) -> None:
        """`on_closed`: told when the connection this host opens is closed for good."""
        self.agent = agent
        self.settings = settings
        self.subjects = settings.subjects
        self.instance = instance or new_instance_id(agent.name)
        check_instance_id(self.instance, agent.name)
        self.model_name = split_model(agent.spec.model)[1]
        # Built here, not mid-task, so a missing API key fails at start-up. The spec's model
        # and its fallbacks, each traced and measured, behind the shared limits, budgets and
        # prices (chorus.spend).
        self.metrics = AgentInstruments()  # a registry of its own: /metrics (agent.process)
        self.model: LimitedModel = agent_model(
            agent.spec,
            settings,
            model,
            observe=lambda provider, spec_model: ObservedModel(
                provider, self.metrics, agent.name, spec_model
            ),
        )
        self.toolbox = build_toolbox(agent.spec, self, agent.tools)
        self.stats = InstanceStats()
        self.metrics.follow(lambda: self.stats.in_flight, lambda: self.stats.waiting)
        self.started_at = time.time()
        self._nc = nc
        self._on_closed = on_closed
        self._owns_connection = nc is None
        self._slots = asyncio.Semaphore(agent.spec.max_concurrency)
        self._room = asyncio.Event()
        self._room.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._service: Service | None = None
        self._draining = False
        self._stopped = asyncio.Event()
        self._state: SharedState | None = None
        self._queue: TaskQueue | None = None
        self._events: DurableConsumer | None = None
        self._sessions: SessionStore | None = None
        self._ledger: EffectLedger | None = None
        self._approvals: ApprovalBook | None = None
        self._claims = ClaimKeeper(EVENT_ACK_WAIT_S / 3)
        self._streams: TaskStreams | None = None  # the tasks' live output, once connected
        self._held: dict[str, int] = {}  # task id -> copies received and not yet answered
        self._run_work: RunWork | None = None  # cancel and steer by run, once connected

    @property
    def nc(self) -> Client:
        assert self._nc is not None, "start() the host first"
        return self._nc

    async def shared_state(self) -> SharedState:
        """Opened on first use, so agents that never touch state pay nothing at start-up."""
        if self._state is None:
            from chorus.state import SharedState

            self._state = await SharedState(self.nc, self.subjects, self.instance).open()
        return self._state

    @property
    def run_work(self) -> RunWork:
        """The tasks of this instance by run: cancels reach them, steer messages too."""
        assert self._run_work is not None, "start() the host first"
        return self._run_work

    @property
    def client(self) -> ChorusClient:
        return ChorusClient(self.nc, self.subjects, timeout=self.settings.request_timeout)

    @property
    def queue(self) -> TaskQueue:
        """Durable tasks to peers (agents as tools), on this instance's connection."""
        if self._queue is None:
            self._queue = TaskQueue(self.nc, self.subjects)
        return self._queue

    async def start(self) -> None:
        # Before connecting: a model that cannot run the hosted tools fails here, cleanly.
        self.toolbox.check(self.model)
        if self._nc is None:
            self._nc = await connect(
                self.settings,
                f"agent:{self.instance}",
                service=True,
                on_closed=self._on_closed,
            )
        # Connected: MCP servers start, peers are described, side effects go through the
        # effect ledger (its records under this agent's name), model calls through the shared
        # limits and budgets.
        self._ledger = EffectLedger(
            self.nc, self.subjects, owner=self.agent.name, replicas=self.settings.replicas
        )
        await self.toolbox.start(self.model, self._ledger)
        await attach_spend(self.model, self.nc, self.settings, self.instance)
        self._run_work = RunWork(self.nc, self.subjects)
        await self._run_work.start()  # before any task can arrive: no cancel slips past
        self._streams = TaskStreams(self.nc, self.subjects, max_age_s=self.settings.stream_max_age)
        await self._streams.ready()  # checked now, not on the first task's first token
        spec = self.agent.spec
        self._service = await add_service(
            self.nc,
            name=self.subjects.micro_service,
            version=__version__,
            description=spec.description or f"Chorus agent {spec.name}",
            metadata={
                "agent": spec.name,
                "instance": self.instance,
                "capabilities": ",".join(spec.capabilities),
                "max_concurrency": str(spec.max_concurrency),
                "model": spec.model,
                **peer_metadata(spec.description, spec.input_schema),
            },
        )
        await self._add_endpoint("task", self.subjects.agent_task(self.instance), self.instance)
        await self._add_endpoint(
            "name", self.subjects.named_task(spec.name), self.subjects.named_queue(spec.name)
        )
        for capability in spec.capabilities:
            await self._add_endpoint(
                f"cap-{capability}",
                self.subjects.capability_task(capability),
                self.subjects.capability_queue(capability),
            )
            await self._add_endpoint(
                f"help-{capability}",
                self.subjects.help(capability),
                self.subjects.help_queue(capability),
            )
        if spec.subscribes:
            # Bound before start() returns: with "new events only" delivery, an event
            # published once the instance says it is ready must not be missed.
            self._events = await self._bind_events()
            self._loops.append(
                asyncio.create_task(self._consume_events(self._events), name="events")
            )
        # Routed first, then announced: a heartbeat says "ready", and whoever hears it may
        # send a task (or a SIGTERM) at once.
        await self._served()
        self._loops.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeats"))
        log.info(
            "agent ready",
            extra={"agent": spec.name, "instance": self.instance, "caps": spec.capabilities},
        )

    async def _served(self) -> None:
        """Return once the server routes to this instance's endpoints: its own `$SRV.PING`
        answered through the server (subscribed after them, on the same connection) proves
        every endpoint subscription is in place. A flush alone was seen to return before a
        task sent at once found a listener (no responders, under load)."""
        assert self._service is not None
        ping = self.subjects.micro_ping_one(self._service.id)
        await wire.request(self.nc, ping, b"", timeout=10)

    async def _add_endpoint(self, name: str, subject: str, queue: str) -> None:
        assert self._service is not None
        kind = "help" if name.startswith("help-") else "task"
        await self._service.add_endpoint(
            EndpointConfig(
                name=name,
                subject=subject,
                queue_group=queue,
                handler=partial(self._on_request, kind),
            )
        )

    # requests: decode at once, run in a tracked task so the subscription keeps flowing

    async def _on_request(self, kind: str, request: Request) -> None:
        try:
            if len(request.data) > self.settings.max_message_bytes:
                raise PayloadTooLarge(
                    f"message of {len(request.data)} bytes is over the limit of "
                    f"{self.settings.max_message_bytes}; put large inputs in the state store"
                )
            if self._draining:
                raise Draining(f"instance {self.instance} is shutting down; retry elsewhere")
            message: Task | HelpRequest = (
                decode(request.data, Task) if kind == "task" else decode(request.data, HelpRequest)
            )
            if isinstance(message, Task):
                message = self._check_depth(message, headers.depth_of(request.headers))
        except ChorusError as exc:
            await self._respond_error(request, exc)
            log.warning("rejected request", extra={"subject": request.subject, "error": str(exc)})
            return
        if isinstance(message, Task):
            self._held[message.task_id] = self._held.get(message.task_id, 0) + 1
        self._spawn(handling(self._serve(message, request), request, self))

    def _check_depth(self, task: Task, header_depth: int) -> Task:
        """The task at the deeper of the depths its body and headers say; DepthExceeded when
        that is past `max_depth` (agents calling each other as tools in a loop)."""
        depth = max(task.depth, header_depth)
        if depth > self.settings.max_depth:
            raise DepthExceeded(
                f"task {task.task_id} reached {self.agent.name} through {depth} agents-as-tools "
                f"hops; the most is {self.settings.max_depth} (CHORUS_MAX_DEPTH): answer "
                "without asking another agent"
            )
        return task if depth == task.depth else msgspec.structs.replace(task, depth=depth)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, message: Task | HelpRequest, request: Request) -> None:
        task_id = message.task_id if isinstance(message, Task) else message.request_id
        try:
            body = await self._run(message)
            await wire.respond(request, body, headers.for_result(task_id, message.run_id))
        except ChorusError as exc:  # a failed handler, or a result too large to send
            await self._respond_error(request, exc, task_id)
        finally:
            if isinstance(message, Task):
                self._release(task_id)

    def _release(self, task_id: str) -> None:
        """The task is answered (or abandoned): heartbeats stop listing it."""
        left = self._held.get(task_id, 0) - 1
        if left > 0:
            self._held[task_id] = left
        else:
            self._held.pop(task_id, None)

    def held_tasks(self) -> list[str] | None:
        """The task ids a heartbeat lists; None when there are too many to list."""
        return list(self._held) if len(self._held) <= MAX_LISTED_TASKS else None

    async def _run(self, message: Task | HelpRequest) -> bytes:
        """Run one handler under the concurrency limit; failures become ChorusErrors."""
        ctx = Context(
            self,
            run_id=message.run_id,
            instructions=self.agent.spec.instructions,
            depth=message.depth if isinstance(message, Task) else 0,
        )
        if isinstance(message, Task):
            ctx.task_id, ctx.attempt = message.task_id, message.attempt
            # A workflow step's tasks are `<run>-<step>-<attempt>`; a durable task keeps its
            # id across attempts: either way, the identity its retries share.
            step_scope = f"{message.run_id}-{message.step}"
            ctx.effect_scope = step_scope if message.step and message.run_id else message.task_id
            ctx.can_park = True
        waiting: Waiting | None = None
        what = f"task {message.task_id}" if isinstance(message, Task) else "a help request"
        async with self.run_work.running(message.run_id, what), self._slot() as started:
            try:
                if isinstance(message, Task):
                    assert self._streams is not None, "start() the host first"
                    async with self._streams.opened(message, self.agent.name) as stream:
                        ctx.stream = stream
                        try:
                            reply = await self._handle_task(message, ctx)
                        except Waiting as parked:  # slot freed, nothing holds the task now
                            waiting, reply = parked, Reply(output=parked.text)
                        else:
                            stream.final(reply.output)
                    if waiting is None:
                        await self._publish_events(ctx.events)
                else:
                    reply = await self.agent.handle_help(message, ctx)
            except (ChorusError, asyncio.CancelledError):  # cancelled: its run, or shutdown
                self._finish(started, ok=False, usage=ctx.own_usage)
                raise
            except Exception as exc:
                self._finish(started, ok=False, usage=ctx.own_usage)
                log.exception("handler failed", extra={"instance": self.instance})
                raise TaskFailed(f"{type(exc).__name__}: {exc}") from exc
            duration_ms = self._finish(started, ok=True, usage=ctx.own_usage)
        if isinstance(message, Task):
            return encode(
                Result(
                    task_id=message.task_id,
                    agent=self.agent.name,
                    instance=self.instance,
                    output=reply.output,
                    data=reply.data,
                    usage=ctx.usage,
                    duration_ms=duration_ms,
                    events=ctx.events,
                    tool_calls=ctx.tool_calls,
                    in_doubt=await self._in_doubt(ctx),
                    model=ctx.task_model.last_model or self.agent.spec.model,
                    by_model=ctx.task_model.by_model,
                    waiting_for=waiting.approvals if waiting is not None else [],
                    waiting_until=waiting.until if waiting is not None else "",
                )
            )
        return encode(
            HelpReply(
                request_id=message.request_id,
                answer=reply.output,
                helper=self.agent.name,
                instance=self.instance,
                data=reply.data,
                usage=ctx.usage,
            )
        )

    async def _handle_task(self, task: Task, ctx: Context) -> Reply:
        """The handler's reply; Waiting when the task is parked on approvals."""
        book = self.approvals
        if task.resume:
            ctx.resume_from, _ = await resume_start(
                book,
                task,
                agent=self.agent.name,
                toolbox=self.toolbox,
                ledger=self._ledger,
                context=ctx.tool_context(),
            )
        try:
            return await self._handle_in_session(task, ctx)
        except Parked as parked:
            raise await park(
                book,
                parked,
                task,
                agent=self.agent.name,
                instance=self.instance,
                toolbox=self.toolbox,
                default_timeout_s=self.settings.approval_timeout,
            ) from None

    @property
    def approvals(self) -> ApprovalBook:
        """Approvals and parked tasks (KV), opened on first use."""
        if self._approvals is None:
            self._approvals = ApprovalBook(self.nc, self.subjects, create=False)
        return self._approvals

    async def _handle_in_session(self, task: Task, ctx: Context) -> Reply:
        if not task.session_id:
            return await self.agent.handle_task(task, ctx)
        replies: list[Reply] = []

        async def handle(history: Sequence[Item]) -> tuple[str, list[ToolCallRecord]]:
            ctx.history = tuple(history)
            replies.append(await self.agent.handle_task(task, ctx))
            return replies[-1].output, ctx.tool_calls

        spec = self.agent.spec.session or SessionSpec()
        await in_session(await self.sessions(), spec, task, handle)
        return replies[-1]

    async def _in_doubt(self, ctx: Context) -> list[str]:
        """The effect ledger's in-doubt calls of the task, when a side-effect tool of it failed
        (a call in doubt reaches the model as a tool error). Never fails the task: a ledger
        that cannot be read is logged."""
        tools = self.toolbox.tools
        failed = {c.name for c in ctx.tool_calls if c.error}
        if self._ledger is None or not any(
            name in tools and tools[name].definition.side_effect for name in failed
        ):
            return []
        try:
            return [r.key for r in await self._ledger.in_doubt(ctx.effect_scope)]
        except (NatsError, TimeoutError, ChorusError) as exc:
            log.warning(
                "effect ledger not read", extra={"task_id": ctx.task_id, "error": repr(exc)}
            )
            return []

    async def sessions(self) -> SessionStore:
        """The conversation sessions, opened on first use."""
        if self._sessions is None:
            store = SessionStore(
                self.nc,
                self.subjects,
                self.settings.session_ttl,
                agent=self.agent.name,
                holder=self.instance,
                replicas=self.settings.replicas,
            )
            self._sessions = await store.open()
        return self._sessions

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[float]:
        """Hold one of `max_concurrency` slots; yields the start time."""
        self.stats.waiting += 1
        self._update_room()
        try:
            await self._slots.acquire()
        finally:
            self.stats.waiting -= 1
        self.stats.in_flight += 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
        try:
            yield time.monotonic()
        finally:
            self.stats.in_flight -= 1
            self._slots.release()
            self._update_room()

    def _update_room(self) -> None:
        busy = self.stats.in_flight + self.stats.waiting
        if busy < self.agent.spec.max_concurrency:
            self._room.set()
        else:
            self._room.clear()

    def _finish(self, started: float, *, ok: bool, usage: Usage) -> float:
        duration_ms = (time.monotonic() - started) * 1000
        self.metrics.handle_done(self.agent.name, duration_ms / 1000, ok=ok)
        tracing.record_usage(None, usage)  # on the invoke_agent span of this handler
        self.stats.total_latency_ms += duration_ms
        self.stats.usage = self.stats.usage + usage
        if ok:
            self.stats.processed += 1
        else:
            self.stats.failed += 1
        return duration_ms

    async def _respond_error(self, request: Request, exc: ChorusError, task_id: str = "") -> None:
        trace = exc.tool_calls if isinstance(exc, MaxTurnsExceeded) else []
        tracing.mark_failed(exc.code, exc.reason)
        body = encode(
            ErrorReply(
                code=exc.code,
                reason=exc.reason,
                task_id=task_id,
                instance=self.instance,
                tool_calls=trace,
            )
        )
        await wire.respond(request, body, headers.for_error(exc.code, exc.reason))

    async def _publish_events(self, events: list[Event]) -> None:
        for event in events:
            await self.client.publish_event(event)

    # events: a durable pull consumer shared by every replica of this agent

    async def _bind_events(self) -> DurableConsumer:
        js = self.nc.jetstream()
        # Agent credentials may read the events stream but not create it (the services do).
        await ensure_or_await(
            js, self.subjects.events_stream, lambda: ensure_events_stream(js, self.subjects)
        )
        config = ConsumerConfig(
            durable_name=self.subjects.event_consumer(self.agent.name),
            filter_subjects=[self.subjects.event(t) for t in self.agent.spec.subscribes],
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=EVENT_ACK_WAIT_S,
            max_deliver=EVENT_MAX_DELIVER,
            deliver_policy=DeliverPolicy.NEW,
        )
        consumer = DurableConsumer(js, self.subjects.events_stream, config, fetch_wait=2.0)
        await consumer.bind()
        return consumer

    async def _consume_events(self, consumer: DurableConsumer) -> None:
        async def room() -> int:
            await self._room.wait()
            return 1

        async def handle(msg: Msg) -> None:
            self._spawn(handling(self._handle_event(msg), msg, self, event=True))

        await consumer.run(room, handle, stopping=lambda: self._draining)

    async def _handle_event(self, msg: Msg) -> None:
        try:
            event = decode(msg.data, Event)
        except InvalidMessage as exc:
            log.error("dropping malformed event", extra={"subject": msg.subject, "error": str(exc)})
            await msg.term()
            return
        ctx = Context(self, run_id=event.run_id, instructions=self.agent.spec.instructions)
        with self._claims.holding(msg):
            async with self._slot() as started:
                try:
                    await self.agent.handle_event(event, ctx)
                    if ctx.events:  # the reaction's tokens travel with its first event
                        ctx.events[0] = msgspec.structs.replace(ctx.events[0], usage=ctx.usage)
                    await self._publish_events(ctx.events)
                except Exception as exc:
                    self._finish(started, ok=False, usage=ctx.own_usage)
                    attempt = msg.metadata.num_delivered
                    log.warning(
                        "event handler failed",
                        extra={"topic": event.topic, "attempt": attempt, "error": repr(exc)},
                    )
                    await msg.nak(delay=backoff(attempt, base=2.0))
                    return
                self._finish(started, ok=True, usage=ctx.own_usage)
            await msg.ack_sync(timeout=5)

    # heartbeats

    def heartbeat(self, state: InstanceState = "ready") -> Heartbeat:
        spec = self.agent.spec
        return Heartbeat(
            instance=self.instance,
            name=spec.name,
            capabilities=list(spec.capabilities),
            in_flight=self.stats.in_flight,
            max_concurrency=spec.max_concurrency,
            processed=self.stats.processed,
            failed=self.stats.failed,
            mean_latency_ms=round(self.stats.mean_latency_ms, 3),
            interval_s=self.settings.heartbeat_interval,
            started_at=self.started_at,
            state=state,
            waiting=self.stats.waiting,
            usage=self.stats.usage,
            version=__version__,
            tasks=self.held_tasks(),
        )

    async def _publish_heartbeat(self, state: InstanceState) -> None:
        hb = self.heartbeat(state)
        await wire.publish(self.nc, self.subjects.heartbeat(self.instance), encode(hb))

    async def _heartbeat_loop(self) -> None:
        while True:
            # Not while reconnecting: nats-py would buffer it and send it late, telling of
            # tasks held (or not) at a time long past.
            if self.nc.is_connected:
                await self._publish_heartbeat("draining" if self._draining else "ready")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self.settings.heartbeat_interval)
                return

    # shutdown

    async def stop(self, timeout: float = 30.0) -> None:
        """Drain: take nothing new, finish what is in flight, leave the registry, disconnect."""
        if self._draining:
            return
        self._draining = True
        self._room.set()  # wake the event loop so it sees the drain
        log.info("draining", extra={"instance": self.instance, "in_flight": len(self._tasks)})
        await self._publish_heartbeat("draining")
        if self._service is not None:
            await self._service.stop()
        for loop in self._loops:
            if loop.get_name() == "events":
                loop.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("drain timed out", extra={"cancelled": len(pending)})
        self._stopped.set()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self._claims.stop()
        await self._publish_heartbeat("stopped")
        if self._run_work is not None:
            await self._run_work.stop()
        await self.toolbox.close()
        await self.model.close()
        if self._state is not None:
            await self._state.close()
        if self._queue is not None:
            await self._queue.close()
        await self.nc.flush(timeout=5)
        if self._owns_connection:
            # Everything is unsubscribed; drain() can hang on JetStream pull inboxes.
            await self.nc.close()
        log.info("agent stopped", extra={"instance": self.instance})
