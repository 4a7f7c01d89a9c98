"""What `bench.chaos` checks at the end, read from the stores rather than from what the
submitters were told: every write the tasks bucket kept on an outcome key (a key written
twice shows as two messages), every dead letter, every run record and every write of the
runs bucket, each with the time the server stored it."""

from __future__ import annotations

import datetime
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from chorus.client.runstore import KvRunStore
from chorus.errors import ChorusError
from chorus.messages import DeadLetter, RunRecord, TaskOutcome, decode, headers
from chorus.subjects import Subjects

BATCH = 256
_REMOVED = ("DEL", "PURGE", "MARKER")


@dataclass
class Submission:
    """One durable task the bench submitted, and what its submitter heard."""

    task_id: str
    poison: bool
    work_s: float
    submitted_at: float  # epoch seconds, just before `submit`
    accepted: bool | None = None  # None: submit raised (`error`)
    heard: TaskOutcome | None = None
    error: str = ""  # what submit or wait raised


@dataclass
class RunSubmission:
    run_id: str
    workflow: str
    submitted_at: float
    error: str = ""


@dataclass
class Resubmission:
    """A task id submitted again at the end, `age_s` after its first submission."""

    task_id: str
    age_s: float
    queued: bool | None = None  # True: the queue took it as new (it would run again)
    heard: TaskOutcome | None = None
    error: str = ""


@dataclass
class Stored:
    """Every outcome write kept on one task's key, in stream order, with its store time."""

    outcomes: list[TaskOutcome] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    @property
    def first(self) -> TaskOutcome:
        return self.outcomes[0]

    @property
    def at(self) -> float:
        return self.times[0]


@dataclass
class Stores:
    outcomes: dict[str, Stored]  # task id -> its writes (bench tasks and workflow steps)
    dead_letters: Counter[str]  # task id -> letters
    runs: dict[str, RunRecord | None]  # run id -> record (None: not stored)
    run_writes: dict[str, list[float]]  # run id -> store times of its keys' writes
    step_writes: list[float]  # store times of every step record (orchestrators write them)


def _stored_at(msg: Msg) -> float:
    stamp: datetime.datetime = msg.metadata.timestamp
    return stamp.timestamp()


async def every_message(js: JetStreamContext, stream: str, subject: str) -> list[Msg]:
    """Every message `stream` holds under `subject`, oldest first, without KV delete or
    expiry markers: one ephemeral pull consumer read to its end."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
        mem_storage=True,
    )
    subscription = await js.pull_subscribe(subject, stream=stream, config=config)
    found: list[Msg] = []
    try:
        pending = (await subscription.consumer_info()).num_pending or 0
        while pending > 0:
            batch = await subscription.fetch(min(pending, BATCH), timeout=10)
            found.extend(m for m in batch if headers.kv_operation(m.headers) not in _REMOVED)
            pending = batch[-1].metadata.num_pending or 0
    finally:
        await subscription.unsubscribe()
    return found


async def read_stores(js: JetStreamContext, subjects: Subjects, run_ids: list[str]) -> Stores:
    outcomes: dict[str, Stored] = defaultdict(Stored)
    for msg in await every_message(js, subjects.tasks_stream, subjects.all_outcomes):
        task_id = msg.subject.rsplit(".", 1)[-1]
        outcomes[task_id].outcomes.append(decode(msg.data, TaskOutcome))
        outcomes[task_id].times.append(_stored_at(msg))
    letters: Counter[str] = Counter()
    for msg in await every_message(js, subjects.dead_letter_stream, subjects.all_dead_letters):
        letters[decode(msg.data, DeadLetter).task.task_id] += 1
    runs: dict[str, RunRecord | None] = {}
    store = await KvRunStore.open(js, subjects)
    for run_id in run_ids:
        try:
            runs[run_id] = await store.load(run_id)
        except ChorusError:
            runs[run_id] = None
    run_writes: dict[str, list[float]] = defaultdict(list)
    step_writes: list[float] = []
    for msg in await every_message(js, subjects.runs_kv_stream, subjects.runs_key_subject(">")):
        key = subjects.runs_key(msg.subject)
        run_writes[key.split(".", 1)[0]].append(_stored_at(msg))
        if ".step." in key:
            step_writes.append(_stored_at(msg))
    return Stores(dict(outcomes), letters, runs, dict(run_writes), sorted(step_writes))


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def invariants(
    submissions: list[Submission],
    run_submissions: list[RunSubmission],
    resubmissions: list[Resubmission],
    stores: Stores,
) -> list[Check]:
    """The promises a chaos run checks; any one broken fails the run."""
    accepted = [s for s in submissions if s.accepted]
    refused = [s for s in submissions if not s.accepted]
    lost = [s.task_id for s in accepted if s.task_id not in stores.outcomes]
    twice = sorted(t for t, w in stores.outcomes.items() if len(w.outcomes) > 1)
    missed = [s.task_id for s in accepted if s.task_id in stores.outcomes and s.heard is None]
    misheard = [
        s.task_id
        for s in accepted
        if s.heard is not None and s.heard != stores.outcomes[s.task_id].first
    ]
    poison = {s.task_id for s in accepted if s.poison}
    letters = stores.dead_letters
    extra_letters = sorted(t for t in letters if t not in poison)
    poison_wrong = sorted(
        t for t in poison if letters[t] != 1 or _status(stores, t) not in ("failed", None)
    )
    good_failed = sorted(
        s.task_id for s in accepted if not s.poison and _status(stores, s.task_id) == "failed"
    )
    unfinished = {
        r.run_id: _run_status(stores.runs.get(r.run_id)) for r in run_submissions if not r.error
    }
    not_completed = {k: v for k, v in unfinished.items() if v != "completed"}
    run_refused = [r.run_id for r in run_submissions if r.error]
    repeated = [
        f"{r.task_id} ({r.error or ('queued again' if r.queued else 'another outcome')})"
        for r in resubmissions
        if r.error or r.queued or r.heard != stores.outcomes[r.task_id].first
    ]

    def sample(ids: list[str] | dict[str, str]) -> str:
        items = [f"{k}: {v}" for k, v in ids.items()] if isinstance(ids, dict) else list(ids)
        return ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")

    return [
        Check("every submit accepted", not refused, sample([s.task_id for s in refused])),
        Check("no task lost", not lost, sample(lost)),
        Check("no outcome written twice", not twice, sample(twice)),
        Check("every submitter heard its outcome", not missed, sample(missed)),
        Check("every submitter heard what is stored", not misheard, sample(misheard)),
        Check(
            "poison tasks dead-lettered exactly once",
            not poison_wrong and not extra_letters,
            sample([*poison_wrong, *(f"{t} (not poison)" for t in extra_letters)]),
        ),
        Check("no good task failed", not good_failed, sample(good_failed)),
        Check("every run submitted", not run_refused, sample(run_refused)),
        Check("every run completed", not not_completed, sample(not_completed)),
        Check(
            "a task id submitted again answers its first outcome",
            not repeated,
            sample(repeated),
        ),
    ]


def _status(stores: Stores, task_id: str) -> str | None:
    written = stores.outcomes.get(task_id)
    return written.first.status if written else None


def _run_status(record: RunRecord | None) -> str:
    return "not stored" if record is None else record.status
