"""The traced round of `bench.routing`: where one request's time goes, step by step.

One request at a time of each kind (raw request-reply, direct `run_task`, durable
`TaskQueue.run`) while the tap (`bench.harness.tap`) records every message on the wire; each
request's timeline is read off the wire and the median of every step is printed. Imported by
`bench.routing`; not a script of its own.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness.baselines import INPUT, INSTRUCTIONS, RAW_SUBJECT, responder
from bench.harness.fleet import TIMEOUT_S, Fleet
from bench.harness.stats import median_us
from bench.harness.tables import markdown_table
from bench.harness.tap import Wire, tapped
from chorus.client import ChorusClient
from chorus.client.durable import TaskQueue
from chorus.messages import Task, encode
from chorus.subjects import Subjects

# A request's timeline is a chain of points on the wire, from `start` (the call) to `end`
# (it returned); each step is the time from the previous point present to this one. Points a
# version of the coordinator does not produce (the KV lookups, only on redelivery) are
# optional: their time falls into the next step. Side steps are off the critical path.
Link = tuple[str, str]  # point, what happens from the previous point up to it

RAW_CHAIN: list[Link] = [
    ("request", "client: request() → request on the wire"),
    ("reply", "responder process: request → reply on the wire"),
    ("end", "client: reply on the wire → request() returns"),
]
DIRECT_CHAIN: list[Link] = [
    ("request", "client: build Task, encode, request → on the wire"),
    ("reply", "agent process: request → Result on the wire"),
    ("end", "client: Result on the wire → run_task() returns"),
]
DURABLE_CHAIN: list[Link] = [
    ("submit", "client: subscribe to the outcome, encode, JetStream publish → on the wire"),
    ("delivered", "server: store in the work queue → deliver to the coordinator's pull"),
    ("get_outcome", "coordinator: → KV get `outcome.<id>` sent"),
    ("got_outcome", "server: KV get `outcome.<id>` answered"),
    ("get_attempts", "coordinator: → KV get `attempts.<id>` sent"),
    ("got_attempts", "server: KV get `attempts.<id>` answered"),
    ("request", "coordinator: delivery (or lookups) → task sent to the agent"),
    ("reply", "agent process: task → Result on the wire"),
    ("create", "coordinator: Result → KV create `outcome.<id>` sent"),
    ("created", "server: KV create stored → PubAck"),
    ("announced", "coordinator: PubAck → outcome announced (core publish)"),
    ("end", "client: announcement → run() returns"),
]
DURABLE_SIDE: list[tuple[str, str, str]] = [
    ("server: store → PubAck to the client (client awaits it)", "submit", "puback"),
    ("coordinator: announced → ack sent (after the answer)", "announced", "ack"),
]
OPTIONAL = {"get_outcome", "got_outcome", "get_attempts", "got_attempts"}


Matcher = Callable[[Wire], bool]


@dataclass(frozen=True)
class ReplyTo:
    """The message sent to the reply subject of an earlier point (an answer, or an ack)."""

    point: str


Points = list[tuple[str, Matcher | ReplyTo]]


def timeline(wire: list[Wire], start: int, end: int, points: Points) -> dict[str, int] | None:
    """When each point of one request was on the wire; None when a required one is missing."""
    at = {"start": start, "end": end}
    seen: dict[str, Wire] = {}
    for name, rule in points:
        hit = None
        if isinstance(rule, ReplyTo):
            earlier = seen.get(rule.point)
            if earlier is not None:
                hit = next(
                    (w for w in wire if w.at >= earlier.at and w.subject == earlier.reply), None
                )
        else:
            hit = next((w for w in wire if w.at >= start and rule(w)), None)
        if hit is None:
            if name in OPTIONAL:
                continue
            return None
        seen[name], at[name] = hit, hit.at
    return at


def request_points(subject: str, task_id: str = "") -> Points:
    def is_request(w: Wire) -> bool:
        return w.subject == subject and w.reply.startswith("_INBOX.") and w.task == task_id

    return [("request", is_request), ("reply", ReplyTo("request"))]


def durable_points(subjects: Subjects, capability: str, task_id: str) -> Points:
    dispatch = subjects.dispatch(f"cap.{capability}")
    # The KV API subject nats-py uses to read the tasks bucket (a wire name, only read here).
    kv_get = f"$JS.API.STREAM.MSG.GET.KV_{subjects.tasks_bucket}"
    agent = f"{subjects.prefix}.agent."

    def ours(w: Wire) -> bool:
        return w.task == task_id

    return [
        ("submit", lambda w: ours(w) and w.subject == dispatch and w.reply.startswith("_INBOX")),
        ("puback", ReplyTo("submit")),
        ("delivered", lambda w: ours(w) and w.subject == dispatch and "$JS.ACK." in w.reply),
        ("get_outcome", lambda w: ours(w) and w.subject == kv_get and w.hint == "outcome"),
        ("got_outcome", ReplyTo("get_outcome")),
        ("get_attempts", lambda w: ours(w) and w.subject == kv_get and w.hint == "attempts"),
        ("got_attempts", ReplyTo("get_attempts")),
        ("request", lambda w: ours(w) and w.subject.startswith(agent)),
        ("reply", ReplyTo("request")),
        ("create", lambda w: ours(w) and w.subject.startswith("$KV.")),
        ("created", ReplyTo("create")),
        ("announced", lambda w: w.subject == subjects.outcome(task_id)),
        ("ack", ReplyTo("delivered")),
    ]


@dataclass
class Traced:
    """The timelines of one kind of request, and how many could not be read."""

    label: str
    chain: list[Link]
    side: list[tuple[str, str, str]] = field(default_factory=list)
    timelines: list[dict[str, int]] = field(default_factory=list)
    unread: int = 0

    def table(self) -> str:
        if not self.timelines:
            return f"{self.label}: no complete timeline ({self.unread} unread)"
        n = len(self.timelines)
        total = median_us([t["end"] - t["start"] for t in self.timelines])
        steps: dict[str, list[int]] = {}
        for t in self.timelines:
            previous = t["start"]
            for point, _ in self.chain:
                if point in t:
                    steps.setdefault(point, []).append(t[point] - previous)
                    previous = t[point]
        rows = []
        for point, label in self.chain:
            if point in steps:
                value = median_us(steps[point])
                seen = "" if len(steps[point]) == n else f" (in {len(steps[point])} of {n})"
                rows.append([label + seen, f"{value:.0f}", f"{value / total:.0%}"])
        rows.append(["**total, as the client measured it**", f"**{total:.0f}**", "100%"])
        for label, a, b in self.side:
            spans = [t[b] - t[a] for t in self.timelines if a in t and b in t]
            if spans:
                rows.append([f"*{label}*", f"*{median_us(spans):.0f}*", ""])
        note = f"; {self.unread} timelines unread" if self.unread else ""
        head = f"{self.label}: medians of {n} sequential requests{note}"
        return head + "\n\n" + markdown_table(["step", "median us", "of total"], rows)


async def traced_calls(
    url: str,
    workdir: Path,
    name: str,
    call: Callable[[], Awaitable[str]],
    n: int,
) -> tuple[list[Wire], list[tuple[str, int, int]]]:
    """Run `call` n times one at a time under the tap; (wire, [(id, start, end)])."""
    marks: list[tuple[str, int, int]] = []
    async with tapped(url, workdir / f"tap-{name}.tsv") as wire:
        for _ in range(n):
            started = time.time_ns()  # the tap's clock
            ident = await call()
            marks.append((ident, started, time.time_ns()))
    return wire, marks


def read_timelines(
    traced: Traced,
    wire: list[Wire],
    marks: list[tuple[str, int, int]],
    points: Callable[[str], Points],
) -> Traced:
    wire = [w for w in wire if w.status != "100"]  # idle heartbeats of pull requests
    for ident, start, end in marks:
        # Tasks are told apart by id, replies by their unique inbox. The tap's copy of a
        # message can reach it after the client has moved on: look a little past the end.
        window = [w for w in wire if start <= w.at < end + 10**9]
        found = timeline(window, start, end, points(ident))
        if found is None:
            traced.unread += 1
        else:
            traced.timelines.append(found)
    return traced


async def trace(fleet: Fleet, n: int, capability: str, durable_timeout: float) -> list[Traced]:
    """One request at a time of each kind under the tap; the median of every step."""
    nc, subjects, workdir = fleet.nc, fleet.subjects, fleet.workdir
    client = ChorusClient(nc, subjects, timeout=TIMEOUT_S)
    queue = TaskQueue(nc, subjects)
    body = encode(Task(input=INPUT, instructions=INSTRUCTIONS, task_id="t-0001"))

    async def raw() -> str:
        await nc.request(RAW_SUBJECT, body, timeout=5)
        return ""

    async with responder(fleet):
        wire, marks = await traced_calls(fleet.url, workdir, "raw", raw, n)

    results = [
        read_timelines(
            Traced("raw request-reply", RAW_CHAIN),
            wire,
            marks,
            lambda _: request_points(RAW_SUBJECT),  # raw requests carry no task id
        )
    ]

    async def direct() -> str:
        task = Task(input=INPUT, instructions=INSTRUCTIONS)
        await client.run_task(task, capability=capability)
        return task.task_id

    wire, marks = await traced_calls(fleet.url, workdir, "direct", direct, n)
    subject = subjects.capability_task(capability)
    results.append(
        read_timelines(
            Traced("chorus direct `run_task`", DIRECT_CHAIN),
            wire,
            marks,
            lambda ident: request_points(subject, ident),
        )
    )

    async def durable() -> str:
        task = Task(input=INPUT, instructions=INSTRUCTIONS)
        await queue.run(task, capability=capability, timeout=durable_timeout)
        return task.task_id

    wire, marks = await traced_calls(fleet.url, workdir, "durable", durable, n)
    results.append(
        read_timelines(
            Traced("chorus durable `TaskQueue.run`", DURABLE_CHAIN, DURABLE_SIDE),
            wire,
            marks,
            lambda ident: durable_points(subjects, capability, ident),
        )
    )
    return results
