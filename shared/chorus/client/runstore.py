"""`KvRunStore`: runs in the JetStream key-value bucket `<prefix>-runs` (file storage), per step.

A run is stored as one small head (`RunHead`, key `<run>`: status, input, output, plan,
a summary of its steps, times), its workflow (`<run>.workflow`, written once), one key per
step (`<run>.step.<n>`) and one per event of its chain (`<run>.event.<n>`). Each is written
when it changes, so a run of n steps writes O(n) bytes however long it gets, and no record
grows past the server's max payload. `load` assembles
the whole `RunRecord` (steps in order, usage summed) for resume, `chorus runs show` and the
gateway alike.

Every save is compare-and-set on the revision this store last read or wrote for that key, so
two orchestrators can never both advance one run: the second gets Conflict, on the head or
on the first step it touches.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from chorus.errors import Conflict, InvalidMessage
from chorus.messages import (
    ENDED_STEP,
    Event,
    HumanAnswer,
    HumanWait,
    RunHead,
    RunRecord,
    StepRecord,
    Usage,
    decode,
    decode_any,
    encode,
)
from chorus.nats.jetstream import last_values
from chorus.nats.streams import ensure_bucket
from chorus.specs.workflow import WorkflowSpec
from chorus.subjects import Subjects

log = logging.getLogger("chorus.client.runstore")

RUN_HISTORY = 5  # a few earlier versions of each key, for looking back at a run
_WATCH_WAIT_S = 5.0


class KvRunStore:
    """Key `<run>` = the RunHead, `<run>.workflow` = its WorkflowSpec, `<run>.step.<n>` = the
    n-th StepRecord, `<run>.event.<n>` = the n-th Event of an event-driven run; a run parked
    on a human step has `<run>.wait` (HumanWait) and the step's answer `<run>.answer.<step>`."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, subjects: Subjects) -> None:
        self.js = js
        self.kv = kv
        self.subjects = subjects
        self._revisions: dict[str, int] = {}
        self._with_workflow: set[str] = set()  # runs whose workflow key is known to exist

    @classmethod
    async def open(
        cls, js: JetStreamContext, subjects: Subjects, *, replicas: int | None = None
    ) -> KvRunStore:
        """Bind to the runs bucket, creating it when it does not exist yet. `replicas` (the
        orchestrator's CHORUS_REPLICAS): its copies (an existing bucket with fewer is raised)."""
        kv = await ensure_bucket(
            js,
            KeyValueConfig(
                bucket=subjects.runs_bucket, history=RUN_HISTORY, storage=StorageType.FILE
            ),
            replicas=replicas,
        )
        return cls(js, kv, subjects)

    def fresh(self) -> KvRunStore:
        """A store on the same bucket that remembers no revisions: its saves check the
        revisions of its own reads."""
        return KvRunStore(self.js, self.kv, self.subjects)

    # reading

    async def head(self, run_id: str) -> RunHead | None:
        """The run's head only: cheap, for status checks and lists."""
        stored = await self._head(run_id)
        return stored.head() if isinstance(stored, RunRecord) else stored

    async def _head(self, run_id: str) -> RunHead | RunRecord | None:
        try:
            entry = await self.kv.get(run_id)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if entry.value is None or entry.revision is None:
            return None
        self._revisions[run_id] = entry.revision
        stored: RunHead | RunRecord = decode_any(entry.value, RunHead | RunRecord)
        return stored  # a RunRecord: stored whole, before runs were stored per step

    async def load(self, run_id: str) -> RunRecord | None:
        """The whole run: the head with its workflow, steps (in order) and events."""
        stored = await self._head(run_id)
        if stored is None:
            return None
        if isinstance(stored, RunRecord):
            record = stored
        else:
            record = RunRecord.assemble(stored, await self._workflow(run_id), [], [])
        steps: dict[int, StepRecord] = {}
        events: dict[int, Event] = {}
        async for key, revision, value in self._children(run_id):
            _, kind, index = key.rsplit(".", 2)
            self._revisions[key] = revision
            if kind == "step":
                steps[int(index)] = decode(value, StepRecord)
            elif kind == "event":
                events[int(index)] = decode(value, Event)
        if steps or not record.steps:
            record.steps = [steps[i] for i in sorted(steps)]
        if events or not record.events:
            record.events = [events[i] for i in sorted(events)]
        # The head's summary may lag its steps by one save (they are written side by side).
        ended = [s for s in record.steps if s.status in ENDED_STEP]
        record.usage = sum((s.usage for s in ended), Usage())
        by_model: dict[str, Usage] = {}
        for step in ended:
            for model, usage in step.by_model.items():
                by_model[model] = by_model.get(model, Usage()) + usage
        record.by_model = by_model
        record.steps_done = sum(s.status in ("completed", "skipped") for s in record.steps)
        record.steps_total = len(record.steps)
        return record

    async def _workflow(self, run_id: str) -> WorkflowSpec:
        try:
            entry = await self.kv.get(f"{run_id}.workflow")
        except (KeyNotFoundError, KeyDeletedError):
            raise InvalidMessage(f"run {run_id} has a head but no workflow stored") from None
        self._with_workflow.add(run_id)
        workflow: WorkflowSpec = decode_any(entry.value or b"", WorkflowSpec)
        return workflow

    async def _children(self, run_id: str) -> AsyncIterator[tuple[str, int, bytes]]:
        """The latest value of every `<run>.*.*` key (steps and events), in one read."""
        subject = self.subjects.runs_key_subject(f"{run_id}.*.*")
        for msg in await last_values(self.js, self.subjects.runs_kv_stream, subject):
            if msg.data:
                key = self.subjects.runs_key(msg.subject)
                yield key, msg.metadata.sequence.stream, msg.data

    async def heads(self) -> list[RunHead]:
        """The head of every run (the single-token keys), in one read; an unreadable head is
        logged and skipped, so one bad value cannot hide every run."""
        subject = self.subjects.runs_key_subject("*")
        records: list[RunHead] = []
        for msg in await last_values(self.js, self.subjects.runs_kv_stream, subject):
            if not msg.data:
                continue
            try:
                stored = decode_any(msg.data, RunHead | RunRecord)
                records.append(stored.head() if isinstance(stored, RunRecord) else stored)
            except InvalidMessage as exc:
                why = {"key": self.subjects.runs_key(msg.subject), "why": exc.reason}
                log.warning("skipping an unreadable run", extra=why)
        return records

    # writing

    async def save(self, record: RunRecord) -> None:
        """Save the head, compare-and-set (and the workflow, the first time)."""
        run_id = record.run_id
        if run_id not in self._with_workflow:
            # Stored by whoever saved the run first: a run's workflow never changes.
            with contextlib.suppress(KeyWrongLastSequenceError):
                await self.kv.create(f"{run_id}.workflow", encode(record.workflow))
            self._with_workflow.add(run_id)
        await self.save_head(record.head())

    async def save_head(self, head: RunHead) -> None:
        """Save the head alone, compare-and-set (a run whose workflow is already stored)."""
        await self._put(head.run_id, head.run_id, encode(head))

    async def save_step(self, run_id: str, index: int, step: StepRecord) -> None:
        """Save the run's `index`-th step, compare-and-set on that step's own key."""
        await self._put(run_id, f"{run_id}.step.{index}", encode(step))

    async def add_event(self, run_id: str, index: int, event: Event) -> None:
        """Record the `index`-th event of the run's chain (written once)."""
        await self._put(run_id, f"{run_id}.event.{index}", encode(event))

    # human steps: the wait of a parked run and the one answer of each human step

    async def park(self, wait: HumanWait) -> None:
        """Say the run waits for an answer (`<run>.wait`): orchestrators time it out."""
        await self.kv.put(self.subjects.run_wait_key(wait.run_id), encode(wait))

    async def unpark(self, run_id: str) -> None:
        """The run waits no more (answered, timed out, cancelled)."""
        with contextlib.suppress(KeyNotFoundError, KeyDeletedError):
            await self.kv.purge(self.subjects.run_wait_key(run_id))

    async def wait_of(self, run_id: str) -> HumanWait | None:
        try:
            entry = await self.kv.get(self.subjects.run_wait_key(run_id))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        return decode(entry.value, HumanWait) if entry.value else None

    async def waits(self) -> list[HumanWait]:
        """Every run parked on a human step, in one read."""
        subject = self.subjects.runs_key_subject(self.subjects.run_wait_key("*"))
        found: list[HumanWait] = []
        for msg in await last_values(self.js, self.subjects.runs_kv_stream, subject):
            if not msg.data:
                continue
            try:
                found.append(decode(msg.data, HumanWait))
            except InvalidMessage as exc:
                log.warning("skipping an unreadable wait", extra={"why": exc.reason})
        return found

    async def answer(self, run_id: str, step: str) -> HumanAnswer | None:
        """The answer of a human step, when it has one."""
        try:
            entry = await self.kv.get(self.subjects.run_answer_key(run_id, step))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        return decode(entry.value, HumanAnswer) if entry.value else None

    async def store_answer(self, answer: HumanAnswer) -> None:
        """Store the step's answer once; Conflict when it has one already (a person's or
        its timeout's: the first one stored wins)."""
        key = self.subjects.run_answer_key(answer.run_id, answer.step)
        try:
            await self.kv.create(key, encode(answer))
        except KeyWrongLastSequenceError:
            raise Conflict(
                f"step {answer.step} of run {answer.run_id} has its answer already"
            ) from None

    async def _put(self, run_id: str, key: str, value: bytes) -> None:
        revision = self._revisions.get(key)
        try:
            if revision is None:
                revision = await self.kv.create(key, value)
            else:
                revision = await self.kv.update(key, value, last=revision)
        except KeyWrongLastSequenceError:
            raise Conflict(
                f"run {run_id} was saved by another process"
                + (f" after revision {revision}" if revision else " already")
                + "; load it again before changing it"
            ) from None
        self._revisions[key] = revision
