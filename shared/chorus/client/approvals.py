"""Approvals: tool calls that wait for a person, and the tasks parked on them.

Every party meets in the KV bucket `<prefix>-approvals` (chorus.subjects has the keys):

- the agent that parks a task writes its `ParkedTask` and one pending `Approval` per call
  that needs a decision (KV create), and announces each on `<prefix>.approvals.<agent>.
  pending`;
- a decider (`chorus approve`, the gateway) changes pending → approved | rejected with a
  compare-and-set on the revision it read, so a decision is taken exactly once and a second
  one is a `Conflict`; then it stores the resume task (same task id, `resume` = the approval)
  in the dispatch queue for the agent's name, and marks the approval `resume_sent`;
- the coordinator's sweep (`sweep`, every CHORUS_APPROVAL_SWEEP seconds) applies the timeout
  action of expired approvals the same way, and sends the resume of a decided approval whose
  decider died before it could.

A resume task waits in JetStream until an instance of the agent takes it, so a decision made
while no instance runs is applied when one starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from chorus.errors import ConfigError, Conflict, NotFound
from chorus.messages import Approval, ParkedTask, decode, encode, headers
from chorus.nats import wire
from chorus.nats.jetstream import last_values, ordered_watch
from chorus.nats.streams import ensure_approvals_bucket, ensure_or_await
from chorus.nats.wire import publish_durably
from chorus.subjects import Subjects, dispatch_target

log = logging.getLogger("chorus.client.approvals")

RESUME_GRACE_S = 10.0  # a decider that has not sent the resume this long after deciding died


def iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def parse_iso(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def new_approval_id() -> str:
    return uuid.uuid4().hex[:16]


class ApprovalBook:
    """Read, write and decide approvals; any role opens one on its own connection."""

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        *,
        create: bool = True,
        replicas: int | None = None,
    ) -> None:
        """`create`: make the bucket when missing (services); agents wait for it instead.
        `replicas`: the coordinator's CHORUS_REPLICAS, for the copies it keeps in a cluster."""
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects
        self._create = create
        self._replicas = replicas
        self._kv: KeyValue | None = None

    async def bucket(self) -> KeyValue:
        if self._kv is None:
            if not self._create:
                await ensure_or_await(
                    self.js,
                    self.subjects.approvals_stream,
                    lambda: ensure_approvals_bucket(self.js, self.subjects),
                )
            self._kv = await ensure_approvals_bucket(
                self.js, self.subjects, replicas=self._replicas
            )
        return self._kv

    # the agent's side

    async def park(self, parked: ParkedTask, approvals: list[Approval]) -> None:
        """Store the parked task, then its approvals (a decider may act as soon as one is
        stored), and announce each. Writing again the same ids (a retry) changes nothing."""
        kv = await self.bucket()
        s = self.subjects
        with contextlib.suppress(KeyWrongLastSequenceError):
            await kv.create(s.parked_key(parked.agent, parked.park_id), encode(parked))
        for approval in approvals:
            try:
                await kv.create(
                    s.approval_key(approval.agent, approval.approval_id), encode(approval)
                )
            except KeyWrongLastSequenceError:
                continue
            await self._announce(approval)

    async def parked(self, agent: str, park_id: str) -> ParkedTask:
        kv = await self.bucket()
        try:
            entry = await kv.get(self.subjects.parked_key(agent, park_id))
        except KeyNotFoundError:
            raise NotFound(
                f"parked task {park_id} of agent {agent} is not stored (expired after 30 days, "
                "or removed); the task cannot resume"
            ) from None
        return decode(entry.value or b"", ParkedTask)

    # reading

    async def get(self, approval_id: str, agent: str = "") -> tuple[Approval, int]:
        """The approval and its revision; NotFound when there is none with that id. Given
        its `agent`, one read of its key (what an agent's credentials allow)."""
        kv = await self.bucket()
        if agent:
            try:
                entry = await kv.get(self.subjects.approval_key(agent, approval_id))
            except KeyNotFoundError:
                raise NotFound(f"no approval {approval_id} of agent {agent}") from None
            return decode(entry.value or b"", Approval), entry.revision or 0
        try:
            pattern = self.subjects.approval_lookup(approval_id)
        except ConfigError:
            raise NotFound(f"no approval {approval_id!r}: ids are letters and digits") from None
        found = await self._values(pattern)
        if not found:
            raise NotFound(f"no approval {approval_id}; `chorus approvals` lists pending ones")
        return found[0]

    async def listed(self, *, pending_only: bool = False) -> list[Approval]:
        """Every stored approval (oldest first), or only the pending ones."""
        await self.bucket()
        found = [a for a, _ in await self._values(self.subjects.all_approval_keys)]
        found.sort(key=lambda a: a.created_at)
        return [a for a in found if a.status == "pending"] if pending_only else found

    async def _values(self, pattern: str) -> list[tuple[Approval, int]]:
        s = self.subjects
        messages = await last_values(
            self.js, s.approvals_stream, s.kv_subject(s.approvals_bucket, pattern)
        )
        return [(decode(m.data, Approval), m.metadata.sequence.stream) for m in messages if m.data]

    async def watch(self) -> AsyncIterator[Approval]:
        """Every approval as it is now, then each change as it is stored."""
        s = self.subjects
        await self.bucket()
        changes: asyncio.Queue[Approval] = asyncio.Queue()

        async def on_change(msg: Any) -> None:
            if msg.data:
                changes.put_nowait(decode(msg.data, Approval))

        from nats.js.api import DeliverPolicy

        subscription = await ordered_watch(
            self.js,
            s.kv_subject(s.approvals_bucket, s.all_approval_keys),
            stream=s.approvals_stream,
            cb=on_change,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        )
        try:
            while True:
                yield await changes.get()
        finally:
            await subscription.unsubscribe()

    # deciding

    async def decide(
        self,
        approval_id: str,
        *,
        approve: bool,
        reason: str = "",
        edit: dict[str, Any] | None = None,
        by: str = "",
    ) -> Approval:
        """Approve (with `edit`ed arguments, where the tool allows) or reject, exactly once:
        Conflict when it was decided already (or meanwhile), NotFound when there is none."""
        approval, revision = await self.get(approval_id)
        if approval.decided:
            raise Conflict(
                f"approval {approval_id} was {approval.status} already"
                + (f" by {approval.decided_by}" if approval.decided_by else "")
                + f" at {approval.decided_at}"
            )
        if edit is not None:
            if not approve:
                raise ConfigError("edited arguments go with an approval, not a rejection")
            if not approval.editable:
                raise ConfigError(
                    f"tool {approval.tool} of agent {approval.agent} does not allow edited "
                    "arguments (its spec would say `approval_edit: true`); approve or reject"
                )
        decided = msgspec.structs.replace(
            approval,
            status="approved" if approve else "rejected",
            decided_at=iso(utc_now()),
            decided_by=by,
            reason=reason,
            edited_arguments=edit,
        )
        return await self._settle(decided, revision)

    async def _settle(self, decided: Approval, revision: int) -> Approval:
        kv = await self.bucket()
        key = self.subjects.approval_key(decided.agent, decided.approval_id)
        try:
            revision = await kv.update(key, encode(decided), last=revision)
        except KeyWrongLastSequenceError:
            current, _ = await self.get(decided.approval_id)
            raise Conflict(
                f"approval {decided.approval_id} was {current.status} meanwhile"
                + (f" by {current.decided_by}" if current.decided_by else "")
            ) from None
        log.info(
            "approval decided",
            extra={
                "approval": decided.approval_id,
                "status": decided.status,
                "by": decided.decided_by,
            },
        )
        await self._announce(decided)
        return await self.send_resume(decided, revision)

    async def send_resume(self, approval: Approval, revision: int) -> Approval:
        """Store the task that resumes the parked one in the agent's dispatch queue, then mark
        the approval `resume_sent` (a lost mark only means the sweep sends it again, which the
        dispatcher or the stored outcome makes harmless)."""
        parked = await self.parked(approval.agent, approval.park_id)
        task = msgspec.structs.replace(parked.task, resume=approval.approval_id, capability="")
        task = msgspec.structs.replace(task, agent=approval.agent)
        subject = self.subjects.dispatch(dispatch_target(agent=approval.agent))
        await publish_durably(self.js, subject, encode(task), headers.for_resume_task(task))
        sent = msgspec.structs.replace(approval, resume_sent=True)
        kv = await self.bucket()
        key = self.subjects.approval_key(approval.agent, approval.approval_id)
        try:
            await kv.update(key, encode(sent), last=revision)
        except KeyWrongLastSequenceError:
            log.info(
                "approval changed before resume_sent", extra={"approval": approval.approval_id}
            )
        return sent

    async def _announce(self, approval: Approval) -> None:
        subject = self.subjects.approval_notice(approval.agent, approval.status)
        await wire.publish(self.nc, subject, encode(approval))

    # the sweep (the coordinator runs it)

    async def sweep(self, now: datetime.datetime | None = None) -> tuple[int, int]:
        """Apply the timeout action of every expired pending approval, and send the resume of
        decided ones nobody sent; returns (expired, resumes sent)."""
        now = now or utc_now()
        expired = resent = 0
        await self.bucket()
        for approval, revision in await self._values(self.subjects.all_approval_keys):
            try:
                if approval.status == "pending" and parse_iso(approval.expires_at) <= now:
                    timed_out = msgspec.structs.replace(
                        approval,
                        status="approved" if approval.on_timeout == "approve" else "expired",
                        decided_at=iso(now),
                        decided_by="timeout",
                        reason=f"no decision by {approval.expires_at}",
                    )
                    await self._settle(timed_out, revision)
                    expired += 1
                elif (
                    approval.decided
                    and not approval.resume_sent
                    and (now - parse_iso(approval.decided_at)).total_seconds() > RESUME_GRACE_S
                ):
                    await self.send_resume(approval, revision)
                    resent += 1
            except (Conflict, NotFound) as exc:
                log.info(
                    "approval not swept",
                    extra={"approval": approval.approval_id, "error": exc.reason},
                )
        return expired, resent
