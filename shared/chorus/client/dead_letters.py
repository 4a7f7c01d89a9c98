"""The dead letters of `<PREFIX>_DLQ`: list, show, replay and purge them (`chorus dlq`).

Two kinds are kept there, each on `<prefix>.dlq.<queue>`: a `DeadLetter` (a durable task the
coordinator gave up on: every attempt failed, or it was delivered too often; its outcome is
recorded `failed`) and a `RejectedMessage` (a queue message taken off without being handled:
undecodable, or delivered too often; the body kept is its first 64 KiB).

Replay is at least once. It republishes the original message to its original subject and
waits for JetStream's ack, and only then deletes the letter: a crash in between leaves the
letter, and replaying it again republishes it again. The republish carries the message id
`replay-<dlq sequence>`, so inside the stream's de-duplication window a second replay of one
letter is dropped by the queue itself. A task is republished with the headers Chorus derives
from it (its id, run, deadline: `headers.for_queued_task`); trace context and other headers
of the first submission are not kept. Its `failed` outcome is deleted first (a task id
with an outcome does not run again); an outcome that is `completed` means an earlier replay
ran: the letter is then only deleted. A rejected message is republished with no header but
the message id, and one whose kept body was cut is refused (it would not be the original).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Sequence

import msgspec
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, NotFoundError

from chorus.errors import ConfigError, InvalidMessage
from chorus.messages import DeadLetter, RejectedMessage, TaskOutcome, decode, headers
from chorus.messages.codec import decode_any
from chorus.nats.wire import publish_durably
from chorus.subjects import Subjects

log = logging.getLogger("chorus.client.dead_letters")

READ_BATCH = 256
READ_TIMEOUT_S = 5.0


class Letter(msgspec.Struct, frozen=True, kw_only=True):
    """One dead letter as `chorus dlq` shows it."""

    seq: int  # its sequence in the DLQ stream: what `show`, `replay` name
    queue: str  # `runs`, or a dispatch target (`cap.<c>`, `agent.<name>`)
    kind: str  # dead_letter | rejected_message | unreadable
    code: str
    reason: str
    deliveries: int
    time: str  # ISO 8601 UTC: when it was given up on
    subject: str  # where the original message was published
    task_id: str = ""
    run_id: str = ""
    message: DeadLetter | RejectedMessage | None = None  # None: the letter did not decode


class Replayed(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    subject: str  # where the original was republished ("" when it had run already)
    duplicate: bool  # the queue had it already (an earlier replay inside the window)


def _iso(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _letter(seq: int, subject: str, data: bytes, subjects: Subjects) -> Letter:
    queue = subject.removeprefix(subjects.all_dead_letters[:-1])
    try:
        message: DeadLetter | RejectedMessage = decode_any(data, DeadLetter | RejectedMessage)
    except InvalidMessage as exc:
        return Letter(
            seq=seq,
            queue=queue,
            kind="unreadable",
            code="invalid_message",
            reason=exc.reason,
            deliveries=0,
            time="",
            subject="",
        )
    if isinstance(message, DeadLetter):
        last = message.errors[-1] if message.errors else None
        return Letter(
            seq=seq,
            queue=queue,
            kind="dead_letter",
            code=last.code if last else "",
            reason=last.reason if last else "",
            deliveries=len(message.errors),
            time=_iso(message.time),
            subject=subjects.dispatch(message.target),
            task_id=message.task.task_id,
            run_id=message.task.run_id or "",
            message=message,
        )
    return Letter(
        seq=seq,
        queue=queue,
        kind="rejected_message",
        code=message.code,
        reason=message.reason,
        deliveries=message.deliveries,
        time=_iso(message.time),
        subject=message.subject,
        run_id=message.run_id or "",
        message=message,
    )


class DeadLetters:
    """The DLQ stream, read and changed with operator credentials."""

    def __init__(self, nc: Client, subjects: Subjects) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects
        self.stream = subjects.dead_letter_stream

    def _filter(self, queue: str | None) -> str:
        return self.subjects.dead_letter(queue) if queue else self.subjects.all_dead_letters

    async def list(self, queue: str | None = None) -> list[Letter]:
        """Every letter (of one queue), oldest first: one ephemeral pull consumer, read to
        its end."""
        try:
            await self.js.stream_info(self.stream)
        except NotFoundError:
            return []  # nothing was ever given up on
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
        )
        subscription = await self.js.pull_subscribe(
            self._filter(queue), stream=self.stream, config=config
        )
        found: list[Letter] = []
        try:
            pending = (await subscription.consumer_info()).num_pending or 0
            while pending > 0:
                batch = await subscription.fetch(min(pending, READ_BATCH), timeout=READ_TIMEOUT_S)
                for msg in batch:
                    seq = msg.metadata.sequence.stream
                    found.append(_letter(seq, msg.subject, msg.data, self.subjects))
                pending = batch[-1].metadata.num_pending or 0
        finally:
            await subscription.unsubscribe()
        return found

    async def get(self, seq: int) -> Letter:
        try:
            raw = await self.js.get_msg(self.stream, seq)
        except NotFoundError:
            raise ConfigError(
                f"no dead letter {seq} in {self.stream} (replayed or purged?): "
                "`chorus dlq ls` lists them"
            ) from None
        return _letter(seq, raw.subject or "", raw.data or b"", self.subjects)

    async def replay(self, seq: int) -> Replayed:
        """Republish the original, acked, then delete the letter (at least once)."""
        letter = await self.get(seq)
        message = letter.message
        msg_id = f"replay-{self.stream}-{seq}"
        if isinstance(message, DeadLetter):
            if not await self._clear_failed_outcome(message.task.task_id):
                await self._delete(seq)  # replayed before, and it ran: nothing to send
                return Replayed(seq=seq, subject="", duplicate=True)
            sent = {**headers.for_queued_task(message.task), headers.MSG_ID_HEADER: msg_id}
            body = msgspec.json.encode(message.task)
        elif isinstance(message, RejectedMessage):
            if message.truncated:
                raise ConfigError(
                    f"dead letter {seq} kept only the first {len(message.data)} bytes of its "
                    "message: it cannot be replayed (`chorus dlq show` has what is kept)"
                )
            sent = {headers.MSG_ID_HEADER: msg_id}
            body = message.data
        else:
            raise ConfigError(f"dead letter {seq} does not decode ({letter.reason}): purge it")
        ack = await publish_durably(self.js, letter.subject, body, sent)
        await self._delete(seq)
        log.info(
            "dead letter replayed",
            extra={"seq": seq, "subject": letter.subject, "duplicate": ack.duplicate},
        )
        return Replayed(seq=seq, subject=letter.subject, duplicate=bool(ack.duplicate))

    async def replay_all(self, queue: str | None = None) -> Sequence[Replayed]:
        """Every letter (of one queue), oldest first; the first that cannot be replayed stops
        it (those before it are replayed and gone)."""
        return [await self.replay(letter.seq) for letter in await self.list(queue)]

    async def purge(self, queue: str | None = None) -> int:
        """Delete every letter (of one queue); how many there were."""
        count = len(await self.list(queue))
        if count:
            await self.js.purge_stream(self.stream, subject=self._filter(queue))
        return count

    async def _delete(self, seq: int) -> None:
        with contextlib.suppress(NotFoundError):  # deleted meanwhile: gone either way
            await self.js.delete_msg(self.stream, seq)

    async def _clear_failed_outcome(self, task_id: str) -> bool:
        """Delete the task's `failed` outcome so it may run again; False when its outcome is
        `completed` (an earlier replay ran it)."""
        tasks = await self.js.key_value(self.subjects.tasks_bucket)
        key = self.subjects.outcome_key(task_id)
        try:
            entry = await tasks.get(key)
        except KeyNotFoundError:
            return True
        if entry.value and decode(entry.value, TaskOutcome).status == "completed":
            return False
        await tasks.delete(key)
        return True
