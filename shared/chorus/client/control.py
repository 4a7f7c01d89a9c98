"""The control record of each run (KV `<prefix>-control`, key = run id, `RunControl`): what
reaches the work of a run in every process while it goes.

- Cancelled marker: written before the cancel is announced on `<prefix>.runs.cancel.<run>`,
  so an agent or the dispatcher that looks before starting a task of the run (a task queued
  or sent before the announcement, or an agent that was not listening) does not start it.
- Steer messages: a user message for the run's agents; the tool loop reads the record before
  each model turn and adds the messages its conversation does not have yet.

Writers (the run client: CLI, gateway, Python) update it compare-and-set; readers (agents, the
coordinator) only get it, one key per look, and find nothing when the bucket does not exist
yet (nobody has cancelled or steered a run).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import (
    BucketNotFoundError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from chorus.errors import Conflict, InvalidMessage
from chorus.messages import RunControl, SteerMessage, decode, encode, now
from chorus.nats.streams import ensure_bucket
from chorus.subjects import Subjects

log = logging.getLogger("chorus.client.control")

CONTROL_MAX_AGE_S = 7 * 24 * 3600  # a marker of a run cancelled a week ago matters no more
MAX_STEER = 50  # steer messages kept per run
_UPDATE_TRIES = 20


async def ensure_control_bucket(
    js: JetStreamContext, subjects: Subjects, *, replicas: int | None = None
) -> KeyValue:
    return await ensure_bucket(
        js,
        KeyValueConfig(
            bucket=subjects.control_bucket,
            history=1,
            ttl=CONTROL_MAX_AGE_S,
            storage=StorageType.FILE,
        ),
        replicas=replicas,
    )


class RunControls:
    """Read (and, for the run client, write) the control records of runs."""

    def __init__(self, js: JetStreamContext, subjects: Subjects) -> None:
        self.js = js
        self.subjects = subjects
        self._kv: KeyValue | None = None

    async def _bucket(self, *, create: bool) -> KeyValue | None:
        if self._kv is None:
            if create:
                self._kv = await ensure_control_bucket(self.js, self.subjects)
            else:
                try:
                    self._kv = await self.js.key_value(self.subjects.control_bucket)
                except (BucketNotFoundError, NotFoundError):
                    return None  # nothing was ever cancelled or steered
        return self._kv

    async def get(self, run_id: str) -> RunControl | None:
        """The run's control record; None when nobody has cancelled or steered it (or NATS
        could not answer: logged)."""
        if not run_id:
            return None
        try:
            kv = await self._bucket(create=False)
            if kv is None:
                return None
            entry = await kv.get(run_id)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        except (NatsError, TimeoutError) as exc:
            # A look that cannot be made never fails the work: the cancel announcement
            # still reaches it, and the next look (the next model turn) may succeed.
            log.warning("run control not read", extra={"run_id": run_id, "error": repr(exc)})
            return None
        if not entry.value:
            return None
        try:
            return decode(entry.value, RunControl)
        except InvalidMessage as exc:
            log.warning("unreadable run control", extra={"run_id": run_id, "why": exc.reason})
            return None

    async def is_cancelled(self, run_id: str) -> bool:
        control = await self.get(run_id)
        return control is not None and control.cancelled

    async def mark_cancelled(self, run_id: str, reason: str) -> RunControl:
        def cancel(control: RunControl) -> RunControl:
            control.cancelled, control.reason = True, control.reason or reason
            return control

        return await self._update(run_id, cancel)

    async def add_steer(self, run_id: str, text: str) -> SteerMessage:
        message = SteerMessage(text=text)

        def steer(control: RunControl) -> RunControl:
            control.steer = [*control.steer, message][-MAX_STEER:]
            return control

        await self._update(run_id, steer)
        return message

    async def _update(self, run_id: str, change: Callable[[RunControl], RunControl]) -> RunControl:
        kv = await self._bucket(create=True)
        assert kv is not None
        for attempt in range(_UPDATE_TRIES):
            try:
                entry = await kv.get(run_id)
                current, revision = decode(entry.value or b"{}", RunControl), entry.revision
            except (KeyNotFoundError, KeyDeletedError):
                current, revision = RunControl(run_id=run_id), None
            updated = change(current)
            updated.updated_at = now()
            try:
                if revision is None:
                    await kv.create(run_id, encode(updated))
                else:
                    await kv.update(run_id, encode(updated), last=revision)
                return updated
            except KeyWrongLastSequenceError:
                await asyncio.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        raise Conflict(f"the control record of run {run_id} keeps changing; try again")
