"""The one way Chorus consumes JetStream: a durable pull consumer and a claim keeper.

Agent events, coordinator dispatch and orchestrator runs all use `DurableConsumer`:

- `bind` creates the durable consumer, or keeps an existing one with its position when it
  exists with other settings (an older version's);
- `run` fetches only when the caller says there is room, hands each message to the caller,
  and after any error other than "nothing to fetch" binds again with a backoff (after a
  server restart a pull subscription may not resume by itself, nats-py #504);
- fetches use no idle heartbeat: when messages are already buffered nats-py then sends a
  pull without `expires`, which the server refuses, and the buffered messages sat unacked
  until their claim lapsed (30 s stalls).

`ClaimKeeper` keeps the claims of messages being worked on alive with in-progress acks, one
ticker for all of them, so a long task is not redelivered while it runs.

`ordered_watch` follows a stream in order from a point (events of a run, a KV key's
changes, `chorus tail --history`): nats-py's ordered consumer, re-created after a gap or a
reconnect, resuming after the last message it delivered.

`last_values` reads the latest message of every subject matching a filter (a KV snapshot)
with a pull consumer, whose pending count is exact: nats-py's KV `watch` signals "caught up"
from the push consumer's pending count, which is already 0 once the server has pushed
everything, so a watch over many keys sometimes reports none (1 in 30 reads of 1,000 keys).

`StreamTail` follows what a stream stores from now on (the task outcomes a submitter waits
for), in order and once, across reconnects and server restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy, StreamInfo
from nats.js.errors import BadRequestError

from chorus.messages import headers
from chorus.nats.connection import raise_if_cancelled, subscribe
from chorus.nats.replicas import until_settled

log = logging.getLogger("chorus.nats.jetstream")

FETCH_WAIT_S = 1.0  # how long one pull waits for messages
REBIND_BACKOFF_S = 0.5

Room = Callable[[], Awaitable[int]]
"""Waits until the caller can take messages; returns how many (0: ask again)."""
Handler = Callable[[Msg], Awaitable[None]]
BatchHandler = Callable[[list[Msg]], Awaitable[None]]


def backoff(attempt: int, *, base: float = 1.0, most: float = 30.0) -> float:
    """The delay before delivery `attempt + 1`: doubling from `base`, at most `most`."""
    return float(min(most, base * 2.0 ** max(0, attempt - 1)))


class DurableConsumer:
    """A durable pull consumer on `stream`, shared by every process that binds the same name."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        config: ConsumerConfig,
        *,
        fetch_wait: float = FETCH_WAIT_S,
    ) -> None:
        assert config.durable_name, "a durable consumer needs a name"
        self.js = js
        self.stream = stream
        self.config = config
        self.name: str = config.durable_name
        self.fetch_wait = fetch_wait
        self._subscription: Any = None

    async def bind(self) -> None:
        """Create the consumer (or keep the one that exists) and subscribe to it."""
        try:
            await self.js.add_consumer(self.stream, self.config)
        except BadRequestError as exc:  # exists with other settings: keep it and its position
            log.warning("consumer exists", extra={"consumer": self.name, "error": str(exc)})
        self._subscription = await self.js.pull_subscribe_bind(
            durable=self.name, stream=self.stream
        )

    async def fetch(self, batch: int) -> list[Msg]:
        """Up to `batch` messages, waiting at most `fetch_wait`; [] when there are none.

        Any other failure drops the subscription; the next fetch binds again (after a
        backoff), so a server restart costs one short pause, not the consumer."""
        try:
            if self._subscription is None:
                await self.bind()
            messages: list[Msg] = await self._subscription.fetch(batch, timeout=self.fetch_wait)
            return messages
        except (NatsTimeout, TimeoutError):  # nothing to fetch: nats-py raises either
            return []
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "fetch failed; binding again", extra={"consumer": self.name, "error": repr(exc)}
            )
            self._subscription = None
            await asyncio.sleep(REBIND_BACKOFF_S)  # backoff before binding again
            return []

    async def run(self, room: Room, handle: Handler, *, stopping: Callable[[], bool]) -> None:
        """Fetch while there is room and hand each message to `handle`, until `stopping()`.

        `handle` should return quickly (start the work in a task of its own), or the next
        fetch waits for it."""

        async def each(batch: list[Msg]) -> None:
            for msg in batch:
                await handle(msg)

        await self.run_batches(room, each, stopping=stopping)

    async def run_batches(
        self, room: Room, handle: BatchHandler, *, stopping: Callable[[], bool]
    ) -> None:
        """`run`, handing each fetch's messages over together (never an empty batch): for a
        caller that looks them up at once and must place each before taking the next (the
        dispatcher)."""
        while not stopping():
            wanted = await room()
            if stopping():
                break
            if wanted < 1:
                continue
            batch = await self.fetch(wanted)
            if batch:
                await handle(batch)
            await asyncio.sleep(0)  # let the work just started send before the next pull

    async def unsubscribe(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None


class ClaimKeeper:
    """Keeps messages claimed while they are worked on: `in_progress()` every `every` seconds
    (a third of the consumer's ack wait), one ticker for all held messages."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._held: dict[int, Msg] = {}  # by id(msg): Msg is unhashable
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick(), name="claim-keeper")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, msg: Msg) -> None:
        self.start()
        self._held[id(msg)] = msg

    def release(self, msg: Msg) -> None:
        self._held.pop(id(msg), None)

    @contextlib.contextmanager
    def holding(self, msg: Msg) -> Iterator[None]:
        self.hold(msg)
        try:
            yield
        finally:
            self.release(msg)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.every)  # a schedule, not a wait for something
            for msg in list(self._held.values()):
                try:
                    await msg.in_progress()
                except Exception as exc:  # the server is away: the next tick tries again
                    log.debug("claim not renewed", extra={"error": repr(exc)})


SNAPSHOT_BATCH = 256
_REMOVED = ("DEL", "PURGE", "MARKER")  # delete markers and server-written expiry markers


async def last_values(
    js: JetStreamContext, stream: str, filter_subject: str, *, timeout: float = 5.0
) -> list[Msg]:
    """The latest message of each subject matching `filter_subject` in `stream`, skipping
    KV delete markers: one ephemeral pull consumer, read to its end."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
        mem_storage=True,
    )
    # The consumer is made by the stream's leader: asked again while a cluster elects one (a
    # consumer left by an unanswered attempt lapses after its inactive threshold).
    subscription = await until_settled(
        lambda: js.pull_subscribe(filter_subject, stream=stream, config=config),
        stream,
        None,
        unanswered=True,
    )
    found: list[Msg] = []
    try:
        pending = (await subscription.consumer_info()).num_pending or 0
        while pending > 0:
            batch = await subscription.fetch(min(pending, SNAPSHOT_BATCH), timeout=timeout)
            found.extend(m for m in batch if headers.kv_operation(m.headers) not in _REMOVED)
            pending = batch[-1].metadata.num_pending or 0
    finally:
        await subscription.unsubscribe()
    return found


async def ordered_watch(
    js: JetStreamContext,
    subject: str,
    *,
    stream: str | None = None,
    cb: Handler | None = None,
    deliver_policy: DeliverPolicy = DeliverPolicy.NEW,
    start_time: datetime.datetime | None = None,
    inactive_threshold: float = 30.0,
    named: bool = False,
) -> Any:
    """An ordered push consumer on `subject` (messages to `cb`, or read with `next_msg`):
    from new messages, the last per subject, all, or `start_time` (BY_START_TIME).

    `named`: the consumer gets a fresh random name at each (re-)creation, so nats-py creates
    it with `CONSUMER.CREATE.<stream>.<name>.<subject>`: the filter in the API subject, which
    NATS permissions can scope and the server checks against the request (unnamed, the filter
    is in the request body). A re-creation after a gap needs a new name: the old consumer may
    still exist, and one of the same name cannot change its start (nats-py re-creates with
    the name it was first given, through `_JSI.recreate_consumer`, so that is wrapped)."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME if start_time is not None else deliver_policy,
        opt_start_time=start_time,
        inactive_threshold=inactive_threshold,
        name=_consumer_name() if named else None,
    )
    subscription = await js.subscribe(
        subject, stream=stream, cb=cb, ordered_consumer=True, config=config
    )
    if named:
        _fresh_name_on_recreate(subscription._sub._jsi)
    return subscription


def _consumer_name() -> str:
    return f"w{secrets.token_hex(10)}"


def _fresh_name_on_recreate(jsi: Any) -> None:
    recreate = jsi.recreate_consumer

    async def recreate_named() -> None:
        jsi._ccreq.name = _consumer_name()
        await recreate()

    jsi.recreate_consumer = recreate_named


async def every_stream(js: JetStreamContext) -> list[StreamInfo]:
    """Every stream on the server: nats-py's `streams_info` answers one page (256) only."""
    found: list[StreamInfo] = []
    while page := await js.streams_info(offset=len(found)):
        found += page
    return found


async def every_consumer(js: JetStreamContext, stream: str) -> list[ConsumerInfo]:
    """Every consumer of `stream`: nats-py's `consumers_info` answers one page (256) only."""
    found: list[ConsumerInfo] = []
    while page := await js.consumers_info(stream, offset=len(found)):
        found += page
    return found


START_WITHIN_S = 30.0  # a tail started while the server restarts keeps trying this long
TAIL_HEARTBEAT_S = 1.0  # idle heartbeats of a tail's consumer; two missed re-create it
TAIL_INACTIVE_S = 30.0  # the server drops a tail's consumer this long after nobody listens


class StreamTail:
    """Every message `stream` stores under `subject` after `start()`, handed to `handle` once
    each and in stream order, across reconnects and server restarts.

    An ephemeral push consumer (no acks, in memory) from the next stream sequence. A gap in
    its delivery sequence, an idle heartbeat naming a delivery we never saw, or heartbeats
    that stop (a restarted server has forgotten the consumer) re-create it from the sequence
    after the last message handled, so nothing stored is missed and nothing is handed twice.
    nats-py's ordered consumer does the same, except that its reset before a first message
    starts again from sequence 1: the whole stream.

    Unlike a core subscription on the stored subjects, it never hears a write the stream
    refused (a KV `create` of an existing key), and it misses nothing stored while the
    client was away.
    """

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        subject: str,
        handle: Callable[[Msg], None],
        *,
        heartbeat: float = TAIL_HEARTBEAT_S,
    ) -> None:
        self.js = js
        self.nc = js._nc
        self.stream = stream
        self.subject = subject
        self.handle = handle
        self.heartbeat = heartbeat
        self._next = 0  # the stream sequence to start from when (re-)creating the consumer
        self._delivered = 0  # delivery sequence of the last message seen from the consumer
        self._subscription: Subscription | None = None
        self._alive = False  # anything heard from the consumer since the last check
        self._stale = asyncio.Event()  # a gap: re-create the consumer now
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def position(self) -> int:
        """The next stream sequence this tail will hand on."""
        return self._next

    async def start(self, *, within: float = START_WITHIN_S) -> None:
        """Follow from the message after the last one stored now.

        While the server is away (a restart) reading where the stream ends is tried again
        with a backoff, for `within` seconds. Once that position is known, a consumer that
        cannot be created yet is left to the watchdog, which re-creates it from the same
        position: nothing stored after `start()` began is missed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        delay = 0.1
        while True:
            try:
                info = await self.js.stream_info(self.stream)
                break
            except (NatsTimeout, NoRespondersError, TimeoutError):
                if loop.time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)  # backoff while the server comes back
                delay = min(delay * 2, 2.0)
        self._next = info.state.last_seq + 1
        try:
            await self._follow()
        except (NatsTimeout, NoRespondersError, TimeoutError) as exc:
            self._alive = False  # the watchdog's first check re-creates the consumer
            log.info(
                "stream tail consumer not created yet, the watchdog retries",
                extra={"stream": self.stream, "error": repr(exc)},
            )
        self._watchdog = asyncio.create_task(self._watch(), name=f"tail-{self.stream}")

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        await self._drop_subscription()

    async def _drop_subscription(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _follow(self) -> None:
        """(Re-)create the consumer from `_next`, delivering to a fresh inbox."""
        await self._drop_subscription()
        self._stale.clear()
        inbox = self.nc.new_inbox()
        self._delivered = 0
        # The seam's subscribe: nats-py's own swallows a cancellation that comes meanwhile,
        # and a stop() while the watchdog re-creates the consumer would then wait for ever.
        self._subscription = await subscribe(self.nc, inbox, cb=self._on_message)
        config = ConsumerConfig(
            deliver_subject=inbox,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._next,
            filter_subject=self.subject,
            ack_policy=AckPolicy.NONE,
            idle_heartbeat=self.heartbeat,
            inactive_threshold=TAIL_INACTIVE_S,
            mem_storage=True,
            num_replicas=1,
        )
        await self.js.add_consumer(self.stream, config)
        self._alive = True

    async def _on_message(self, msg: Msg) -> None:
        # Only the current consumer's messages get here: replacing it unsubscribed the old
        # inbox, and nats-py discards what that subscription had not handed on yet.
        self._alive = True
        status = headers.status(msg.headers)
        if status:
            missed = headers.last_delivered(msg.headers) != self._delivered
            if status == headers.IDLE_HEARTBEAT_STATUS and missed:
                self._stale.set()  # a delivery we never received
            return
        sequence = msg.metadata.sequence
        if sequence.consumer != self._delivered + 1:
            self._stale.set()  # a gap: start again after the last message handled
            return
        self._delivered = sequence.consumer
        if sequence.stream < self._next:
            return  # handed on before the consumer was re-created
        self._next = sequence.stream + 1
        self.handle(msg)

    async def _watch(self) -> None:
        while not self.nc.is_closed:
            raise_if_cancelled()  # a cancel a library swallowed (see chorus.nats.connection)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stale.wait(), self.heartbeat * 2)
            if self._alive and not self._stale.is_set():
                self._alive = False  # the next heartbeat sets it again
                continue
            try:
                await self._follow()
                log.info(
                    "stream tail re-created",
                    extra={"stream": self.stream, "from_sequence": self._next},
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the server is still away: the next check retries
                self._stale.clear()
                log.debug("stream tail not re-created", extra={"error": repr(exc)})
