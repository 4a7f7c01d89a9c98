"""One turn at a time per conversation session, across processes, in arrival order.

Each task that wants a session's turn writes a ticket `turn.<agent>.<session>.<ticket>` to
the sessions bucket, with a TTL renewed every third of it while its task lives (a dead holder's
ticket expires, and the server's expiry marker wakes the waiters). The tickets' first
revisions order the turns: the live ticket with the smallest one holds the turn. A waiter
watches the session's ticket keys, so it wakes when the one ahead finishes; nobody polls. The
watch is a named ordered consumer, its filter in the API subject, so the agent's permissions
can cover its own sessions' tickets only.

Policies for a task that finds the turn taken: `enqueue` waits its turn; `reject` raises
SessionBusy at once; `interrupt` publishes a SessionInterrupt on the session's interrupt
subject, which every earlier turn listens to (from before its ticket exists, so none misses
it): the running turn is cancelled, waiting ones give up with SessionInterrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Final

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import APIError

from chorus.errors import ConfigError, SessionBusy, SessionInterrupted
from chorus.messages import SessionInterrupt, SessionPolicy, TurnTicket, encode, headers, new_id
from chorus.nats import wire
from chorus.nats.jetstream import ordered_watch
from chorus.subjects import Subjects

log = logging.getLogger("chorus.agent.turns")

DEFAULT_TICKET_TTL_S: Final = 10
POLICIES: Final = ("enqueue", "reject", "interrupt")
_WRONG_LAST_SEQUENCE: Final = (10071, 10164)
_ticket_decoder = msgspec.json.Decoder(TurnTicket)
_interrupt_decoder = msgspec.json.Decoder(SessionInterrupt)


def check_policy(policy: str) -> SessionPolicy:
    if policy not in POLICIES:
        raise ConfigError(f"session policy {policy!r} is not one of {', '.join(POLICIES)}")
    return policy  # type: ignore[return-value]


class TurnLease:
    """The turn of one session held by this task, as `async with turns.turn(...)` yields."""

    def __init__(self, session_id: str, ticket_id: str, order: int) -> None:
        self.session_id = session_id
        self.ticket_id = ticket_id
        self.order = order  # the ticket's first revision: turns go in this order
        self.interrupted = False


class Turns:
    """Tickets and interrupts of the sessions bucket, for one process (`holder`)."""

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        *,
        agent: str,
        holder: str,
        ticket_ttl_s: int = DEFAULT_TICKET_TTL_S,
    ) -> None:
        """`agent`: the agent name whose sessions' turns these are."""
        if ticket_ttl_s < 2:
            raise ConfigError(f"turn ticket ttl must be at least 2 seconds, got {ticket_ttl_s}")
        self.nc = nc
        self.subjects = subjects
        self.js = nc.jetstream()
        self.agent = agent
        self.holder = holder
        self.ticket_ttl_s = ticket_ttl_s

    def turn(
        self,
        session_id: str,
        policy: str = "enqueue",
        *,
        on_interrupt: Callable[[], object] | None = None,
        timeout: float = 600.0,
    ) -> TurnContext:
        """`async with turns.turn(session_id, policy) as lease:` holds the session's turn.

        `timeout` bounds the wait (SessionBusy after it). When a newer task interrupts the
        turn, `on_interrupt` is called; without one, the task that entered the block is
        cancelled and the block raises SessionInterrupted.
        """
        self.subjects.session_key(self.agent, session_id)  # checks the id
        return TurnContext(self, session_id, check_policy(policy), on_interrupt, timeout)

    async def publish_ticket(self, key: str, ticket: TurnTicket, *, expect: int) -> int:
        sent = headers.for_kv_write(expect=expect, ttl_s=ticket.ttl_s)
        ack = await wire.js_publish(
            self.js, self.subjects.session_subject(key), encode(ticket), sent
        )
        return int(ack.seq)

    async def remove_ticket(self, key: str) -> None:
        # A purge with a short TTL of its own: the key leaves nothing behind.
        sent = headers.for_kv_write(operation="PURGE", rollup=True, ttl_s=1)
        await wire.js_publish(self.js, self.subjects.session_subject(key), b"", sent)


class TurnContext:
    def __init__(
        self,
        turns: Turns,
        session_id: str,
        policy: SessionPolicy,
        on_interrupt: Callable[[], object] | None,
        timeout: float,
    ) -> None:
        self._turns = turns
        self._session_id = session_id
        self._policy = policy
        self._on_interrupt = on_interrupt
        self._timeout = timeout
        self._ticket_id = new_id()
        self._key = turns.subjects.session_turn_key(turns.agent, session_id, self._ticket_id)
        self._revision = 0
        self._order = 0
        self._holding = False
        self._superseded = asyncio.Event()  # a newer turn interrupted this one
        self._cancelled_by_us = False
        self._task: asyncio.Task[object] | None = None
        self._interrupts: object = None
        self._renewer: asyncio.Task[None] | None = None
        self._lease: TurnLease | None = None

    async def __aenter__(self) -> TurnLease:
        turns = self._turns
        self._task = asyncio.current_task()
        # Listen for interrupts before the ticket exists: a newer ticket's interrupt always
        # comes after ours was written, so it cannot be missed.
        self._interrupts = await turns.nc.subscribe(
            turns.subjects.session_interrupt(turns.agent, self._session_id),
            cb=self._on_interrupt_msg,
        )
        live: dict[str, int] = {}
        changed = asyncio.Event()

        async def on_ticket(msg: Msg) -> None:
            key = msg.subject.rsplit(".", 1)[-1]
            if headers.kv_operation(msg.headers) != "PUT" or not msg.data:
                live.pop(key, None)
            else:
                try:
                    ticket = _ticket_decoder.decode(msg.data)
                except msgspec.DecodeError:
                    return
                live[key] = ticket.order or msg.metadata.sequence.stream
            changed.set()

        watch = await ordered_watch(
            turns.js,
            turns.subjects.session_subject(
                turns.subjects.session_turns_key(turns.agent, self._session_id)
            ),
            stream=turns.subjects.sessions_stream,
            cb=on_ticket,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            named=True,
        )
        try:
            ticket = TurnTicket(
                holder=turns.holder,
                ticket_id=self._ticket_id,
                policy=self._policy,
                ttl_s=turns.ticket_ttl_s,
            )
            self._revision = self._order = await turns.publish_ticket(self._key, ticket, expect=0)
            self._renewer = asyncio.create_task(
                self._keep_alive(), name=f"chorus-turn-{self._session_id}"
            )
            await self._wait_turn(live, changed)
        except BaseException:
            await self._leave()
            raise
        finally:
            await _unsubscribe(turns.nc, watch)
        self._holding = True
        self._lease = TurnLease(self._session_id, self._ticket_id, self._order)
        if self._superseded.is_set():  # interrupted in the instant it got the turn
            self._interrupt_now()
        return self._lease

    async def _wait_turn(self, live: dict[str, int], changed: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        mine = self._ticket_id
        announced = False
        while True:
            if self._superseded.is_set():
                raise SessionInterrupted(
                    f"the waiting turn of session {self._session_id!r} was interrupted by a "
                    "newer task"
                )
            if mine in live:  # every earlier ticket was delivered before our own
                ahead = [key for key, order in live.items() if order < self._order]
                if not ahead:
                    return
                if self._policy == "reject":
                    raise SessionBusy(
                        f"session {self._session_id!r} is busy with another turn; "
                        "try again when it is done"
                    )
                if self._policy == "interrupt" and not announced:
                    interrupt = SessionInterrupt(
                        session_id=self._session_id, order=self._order, by=self._turns.holder
                    )
                    await wire.publish(
                        self._turns.nc,
                        self._turns.subjects.session_interrupt(self._turns.agent, self._session_id),
                        encode(interrupt),
                    )
                    announced = True
            changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise SessionBusy(
                    f"session {self._session_id!r} was still busy after waiting "
                    f"{self._timeout:g}s for its turn"
                )
            superseded = asyncio.ensure_future(self._superseded.wait())
            woken = asyncio.ensure_future(changed.wait())
            try:
                await asyncio.wait(
                    [superseded, woken], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                superseded.cancel()
                woken.cancel()

    async def _on_interrupt_msg(self, msg: Msg) -> None:
        try:
            interrupt = _interrupt_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("bad session interrupt ignored", extra={"session": self._session_id})
            return
        if not self._order or interrupt.order <= self._order or self._superseded.is_set():
            return
        self._superseded.set()
        if self._holding:
            self._interrupt_now()

    def _interrupt_now(self) -> None:
        log.info("session turn interrupted", extra={"session": self._session_id})
        if self._lease is not None:
            self._lease.interrupted = True
        if self._on_interrupt is not None:
            self._on_interrupt()
        elif self._task is not None:
            self._cancelled_by_us = True
            self._task.cancel()

    async def _keep_alive(self) -> None:
        turns = self._turns
        ticket = TurnTicket(
            holder=turns.holder,
            ticket_id=self._ticket_id,
            policy=self._policy,
            ttl_s=turns.ticket_ttl_s,
            order=self._order,
        )
        while True:
            await asyncio.sleep(turns.ticket_ttl_s / 3)  # a schedule, not a wait for a condition
            try:
                self._revision = await turns.publish_ticket(
                    self._key, ticket, expect=self._revision
                )
            except APIError as exc:
                if exc.err_code in _WRONG_LAST_SEQUENCE:
                    log.warning("session turn ticket lost", extra={"session": self._session_id})
                    return
                log.warning("session turn renewal failed", extra={"error": repr(exc)})
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("session turn renewal failed", extra={"error": repr(exc)})

    async def _leave(self) -> None:
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            await asyncio.wait([renewer])
        sub, self._interrupts = self._interrupts, None
        await _unsubscribe(self._turns.nc, sub)
        if self._order and not self._turns.nc.is_closed:
            await self._turns.remove_ticket(self._key)
        self._holding = False

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Shielded: an interrupt's cancellation must not stop the ticket's removal.
        await asyncio.shield(self._leave())
        if self._cancelled_by_us and exc_type is asyncio.CancelledError:
            task = self._task
            if task is not None and task.uncancel() == 0:
                raise SessionInterrupted(
                    f"the turn of session {self._session_id!r} was interrupted by a newer task"
                ) from None


async def _unsubscribe(nc: Client, sub: object) -> None:
    if sub is None or nc.is_closed or nc.is_draining:
        return
    with contextlib.suppress(nats.errors.BadSubscriptionError):
        await sub.unsubscribe()  # type: ignore[attr-defined]
