"""Routed tasks through Chorus, against raw nats-py figures measured in the same run.

One embedded nats-server. Agents (`python -m chorus agent run SPEC --instance X`, offline
model: it answers at once) and the coordinator (`python -m chorus coordinator`) run as real
processes, as in production; the requester is this process. Measured, in this order:

- raw baselines, as /work/shared/bench/nats_baseline.py measures them: cross-process core
  request-reply to a tiny nats-py responder process (sequential p50/p99, req/s with 100 in
  flight) and a JetStream work-queue round trip (publish, pull fetch, ack, core reply;
  sequential p50/p99 and req/s with 100 in flight, the worker in this process);
- the direct path, `ChorusClient.run_task(task, capability=...)`: core request-reply to the
  capability's queue group;
- the durable routed path, `TaskQueue.run(task, capability=...)`: a JetStream work queue;
  the coordinator fetches, picks an instance, sends it the task by request-reply, records
  the outcome in KV and announces it;

each with 1 and then 4 agent processes. An agent takes up to 128 tasks at once, more than
the 100 in flight, so an agent's capacity never limits throughput. The payload is the ~1 KB
task of nats_baseline.py. During each phase the CPU of every process is read from
/proc/<pid>/stat (% of one core; the machine has 2; `other` is the rest of the machine, i.e.
noise) and the server's message counters from its /varz, per request. A durable request
slower than 5 s is reported as a stall (it waited for the coordinator's claim timeout).

    python bench/routing.py                    # about 80 s on 2 cores (+30 s per stall)
    python bench/routing.py --smoke            # a few hundred requests, about 15 s
    python bench/routing.py --profile DIR      # also py-spy the 4-agent throughput phases
    python bench/routing.py --trace 0          # without the traced round

At the end, a traced round (`--trace N` requests of each kind, default 300) sends one request
at a time while a tap process subscribed to `>` records the kernel receive time of every
message, and prints the median time of each step (client, server, coordinator, agent):
where the latency goes. The tap is not running while the figures above are measured, and
its times are only as prompt as nats-server's writes to it: trust them on a quiet machine.

`--profile` records each process with py-spy (`pip install py-spy`) and prints where its CPU
goes; sampling perturbs the figures, so take figures from a run without it. Numbers are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.client import ChorusClient
from chorus.client.durable import TaskQueue
from chorus.config import Settings
from chorus.messages import AgentStatusChange, Heartbeat, Metrics, Task, decode, encode
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer, find_binary
from chorus.subjects import Subjects

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Child, cpu_seconds, machine_busy_seconds, markdown_table, spawn

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "bench"
CAPABILITY = "bench"
IN_FLIGHT = 100
MAX_CONCURRENCY = 128  # more than IN_FLIGHT: one agent alone never makes a task wait
TIMEOUT_S = 30.0
# Longer than the coordinator's claim timeout (30 s), so a task that is only redelivered
# after its claim lapses is counted as a stall rather than ending the run.
DURABLE_TIMEOUT_S = 120.0
STALL_S = 5.0

# Targets from the coordinator issue.
TARGET_LATENCY_RATIO = 1.5  # Chorus p50 / matching raw p50
TARGET_THROUGHPUT_SHARE = 0.5  # Chorus req/s with 4 agents / raw req/s, 100 in flight

# The ~1 KB task of nats_baseline.py.
INSTRUCTIONS = "Research the topic." * 5
INPUT = "x" * 880

SPEC = f"""\
name: bencher
description: answers at once (offline model)
model: offline
instructions: Answer at once.
capabilities: [{CAPABILITY}]
max_concurrency: {MAX_CONCURRENCY}
"""

# The responder of nats_baseline.py.
RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def handler(msg):
        await msg.respond(b'{"output":"ok"}')
    await nc.subscribe("bench.xecho", queue="q", cb=handler)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@dataclass(frozen=True)
class Sizes:
    raw_seq: int
    raw_pipe: int
    wq_seq: int
    wq_pipe: int
    direct_seq: int
    direct_pipe: int
    durable_seq: int
    durable_pipe: int
    warmup: int
    traced: int


DEFAULT = Sizes(
    raw_seq=3000,
    raw_pipe=20000,
    wq_seq=2000,
    wq_pipe=5000,
    direct_seq=2000,
    direct_pipe=10000,
    durable_seq=1000,
    durable_pipe=3000,
    warmup=200,
    traced=300,
)
SMOKE = Sizes(
    raw_seq=300,
    raw_pipe=2000,
    wq_seq=300,
    wq_pipe=1000,
    direct_seq=300,
    direct_pipe=1000,
    durable_seq=200,
    durable_pipe=300,
    warmup=30,
    traced=50,
)


# processes and their CPU


def child_env(nats_url: str, prefix: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"NATS_URL": nats_url, "CHORUS_PREFIX": prefix, "PYTHONPATH": str(ROOT)})
    return env


@dataclass
class Fleet:
    """Every process of the run, by role, so a phase can tell where the CPU went."""

    pids: dict[str, list[int]] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)

    def add(self, role: str, pid: int) -> None:
        self.pids.setdefault(role, []).append(pid)

    def adopt(self, child: Child) -> Child:
        self.children.append(child)
        self.add(child.role, child.pid)
        return child

    def snapshot(self) -> dict[str, float]:
        """CPU seconds so far by role; `other` is every process outside the run (noise)."""
        totals: dict[str, float] = {}
        for role, pids in self.pids.items():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                totals[role] = sum(cpu_seconds(pid) for pid in pids)
        totals["other"] = machine_busy_seconds() - sum(totals.values())
        return totals

    async def stop(self, role: str | None = None) -> None:
        chosen = [c for c in self.children if role is None or c.role == role]
        await asyncio.gather(*(c.stop() for c in chosen))
        for child in chosen:
            self.children.remove(child)
            self.pids[child.role].remove(child.pid)


@dataclass
class Figure:
    """One measured phase: latencies (ns), a rate, each role's CPU (% of one core), and the
    CPU time and server messages it cost per request."""

    label: str
    latencies: list[int] = field(default_factory=list)
    rate: float | None = None
    clean_rate: float | None = None  # the rate had the stalled requests not stalled
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_us_per_request: float | None = None  # all roles of the run, `other` excluded
    msgs_per_request: tuple[float, float] | None = None  # server in_msgs, out_msgs
    spread: Counter[str] = field(default_factory=Counter)

    def pct_us(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000

    @property
    def p50(self) -> float:
        return self.pct_us(0.5)

    @property
    def p99(self) -> float:
        return self.pct_us(0.99)

    @property
    def stalls(self) -> int:
        return sum(1 for x in self.latencies if x > STALL_S * 1e9)

    def line(self) -> str:
        parts = [f"{self.label:48s}"]
        if self.latencies:
            parts.append(
                f"p50 {self.p50:7.0f} us  p99 {self.p99:7.0f} us  max {self.pct_us(1):8.0f} us"
            )
        if self.rate is not None:
            parts.append(f"{self.rate:7.0f} req/s")
        if self.stalls:
            parts.append(
                f"STALLS: {self.stalls} requests over {STALL_S:.0f} s; "
                f"without them {self.clean_rate or 0:.0f} req/s"
            )
        if self.cpu_us_per_request is not None:
            parts.append(f"cpu {self.cpu_us_per_request:5.0f} us/req")
        if self.msgs_per_request is not None:
            parts.append("msgs in/out per req {:.1f}/{:.1f}".format(*self.msgs_per_request))
        if len(self.spread) > 1:
            total = sum(self.spread.values())
            shares = sorted((n / total for n in self.spread.values()), reverse=True)
            parts.append("answered " + "/".join(f"{s:.0%}" for s in shares))
        return "  ".join(parts)


# profiling with py-spy


@contextlib.asynccontextmanager
async def profiled(
    directory: Path | None, phase: str, targets: dict[str, int]
) -> AsyncIterator[None]:
    """py-spy each target process (role -> pid) for the duration of the block."""
    if directory is None:
        yield
        return
    spies: list[tuple[str, Path, asyncio.subprocess.Process]] = []
    for role, pid in targets.items():
        out = directory / f"{phase}-{role}.txt"
        spy = await asyncio.create_subprocess_exec(
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--function",
            "--nonblocking",
            "--rate",
            "200",
            "--output",
            str(out),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        spies.append((role, out, spy))
    await asyncio.sleep(0.5)  # py-spy attaches asynchronously; give it a moment
    try:
        yield
    finally:
        for _, _, spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for role, out, spy in spies:
            await asyncio.wait_for(spy.wait(), TIMEOUT_S)
            if out.exists():
                print(f"\n#### py-spy: {phase}, {role} ({out})\n")
                print(summarise_profile(out.read_text()))


def summarise_profile(raw: str, top: int = 14) -> str:
    """Where a process spends its on-CPU samples, from py-spy's raw (folded) output.

    Self time per function, then inclusive time of the Chorus and nats-py functions (the
    event loop's own frames, which contain everything, are left out).
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "(no samples)"

    def interesting(frame: str) -> bool:
        return ("chorus/" in frame or "nats/" in frame or "services/" in frame) and (
            inclusive[frame] < 0.97 * total
        )

    rows = [[f"`{f}`", f"{n / total:.1%}"] for f, n in own.most_common(top)]
    lines = [f"{total} on-CPU samples", "", markdown_table(["function (self)", "share"], rows)]
    ranked = sorted((f for f in inclusive if interesting(f)), key=lambda f: -inclusive[f])
    rows = [[f"`{f}`", f"{inclusive[f] / total:.1%}"] for f in ranked[:top]]
    lines += ["", markdown_table(["Chorus / nats-py function (inclusive)", "share"], rows)]
    return "\n".join(lines)


# measuring

Call = Callable[[], Awaitable[object]]


async def sequential(call: Call, n: int) -> list[int]:
    latencies = []
    for _ in range(n):
        started = time.perf_counter_ns()
        await call()
        latencies.append(time.perf_counter_ns() - started)
    return latencies


async def in_flight(call: Call, n: int, figure: Figure) -> None:
    """Requests per second with IN_FLIGHT outstanding (gather + semaphore, as the baseline),
    and each request's latency from the moment it got its turn."""
    room = asyncio.Semaphore(IN_FLIGHT)
    finished: list[tuple[int, int]] = []  # (done at, latency)

    async def one() -> None:
        async with room:
            sent = time.perf_counter_ns()
            await call()
            done = time.perf_counter_ns()
            finished.append((done, done - sent))

    started = time.perf_counter_ns()
    await asyncio.gather(*(one() for _ in range(n)))
    figure.latencies = [latency for _, latency in finished]
    figure.rate = n * 1e9 / (time.perf_counter_ns() - started)
    quick = [done for done, latency in finished if latency <= STALL_S * 1e9]
    if quick and len(quick) < n:
        figure.clean_rate = len(quick) * 1e9 / (max(quick) - started)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def server_counters(monitor: str) -> tuple[int, int]:
    """in_msgs, out_msgs of the server so far (its /varz monitoring endpoint)."""
    with urllib.request.urlopen(f"{monitor}/varz", timeout=5) as reply:
        varz = json.load(reply)
    return int(varz["in_msgs"]), int(varz["out_msgs"])


@contextlib.asynccontextmanager
async def metered(fleet: Fleet, figure: Figure, monitor: str | None) -> AsyncIterator[None]:
    """Over the block: each role's CPU (% of one core), and per request (one latency each in
    `figure.latencies` by the end) the CPU time and the messages through the server."""
    counters = await asyncio.to_thread(server_counters, monitor) if monitor else None
    before, started = fleet.snapshot(), time.perf_counter()
    yield
    after, wall = fleet.snapshot(), time.perf_counter() - started
    figure.cpu = {r: 100 * max(after[r] - before[r], 0) / wall for r in after if r in before}
    requests = len(figure.latencies)
    if requests:
        used = sum(after[r] - before[r] for r in after if r in before and r != "other")
        figure.cpu_us_per_request = used * 1e6 / requests
    if counters and requests:
        now = await asyncio.to_thread(server_counters, monitor) if monitor else counters
        figure.msgs_per_request = (
            (now[0] - counters[0]) / requests,
            (now[1] - counters[1]) / requests,
        )


@dataclass
class Bench:
    """What every phase uses: the connection, the server and its monitor, the processes."""

    nc: Client
    server: NatsServer
    monitor: str  # the server's monitoring URL
    fleet: Fleet
    sizes: Sizes
    workdir: Path
    subjects: Subjects


@contextlib.asynccontextmanager
async def responder(bench: Bench) -> AsyncIterator[None]:
    """The raw nats-py responder process, for the block."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RESPONDER, bench.server.url, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        await asyncio.wait_for(process.stdout.readline(), TIMEOUT_S)
        bench.fleet.add("responder", process.pid)
        yield
    finally:
        bench.fleet.pids.pop("responder", None)
        process.terminate()
        await process.wait()


async def raw_request_reply(bench: Bench) -> list[Figure]:
    body = encode(Task(input=INPUT, instructions=INSTRUCTIONS, task_id="t-0001"))
    sizes = bench.sizes

    async def call() -> Msg:
        return await bench.nc.request("bench.xecho", body, timeout=5)

    async with responder(bench):
        for _ in range(sizes.warmup):
            await call()
        seq = Figure("raw cross-process request-reply, sequential")
        async with metered(bench.fleet, seq, bench.monitor):
            seq.latencies = await sequential(call, sizes.raw_seq)
        print(seq.line(), flush=True)
        pipe = Figure(f"raw cross-process request-reply, {IN_FLIGHT} in flight")
        async with metered(bench.fleet, pipe, bench.monitor):
            await in_flight(call, sizes.raw_pipe, pipe)
        print(pipe.line(), flush=True)
    return [seq, pipe]


async def raw_work_queue(bench: Bench) -> list[Figure]:
    """Publish task -> pull worker fetch -> ack -> core reply -> requester (nats_baseline.py),
    sequential, then with IN_FLIGHT outstanding (the worker fetches up to 10 at a time)."""
    nc, sizes = bench.nc, bench.sizes
    js = nc.jetstream()
    body = encode(Task(input=INPUT, instructions=INSTRUCTIONS, task_id="t-0001"))
    await js.add_stream(name="RAWWORK", subjects=["rawbench.work.>"], retention="workqueue")
    psub = await js.pull_subscribe("rawbench.work.task", durable="workers", stream="RAWWORK")
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            try:
                msgs = await psub.fetch(10, timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            for m in msgs:
                await m.ack()
                assert m.headers is not None
                await nc.publish(m.headers["Reply-To"], b'{"output":"ok"}')

    work = asyncio.create_task(worker())
    inbox = nc.new_inbox()
    waiting: dict[str, asyncio.Future[int]] = {}

    async def on_result(msg: Msg) -> None:
        waiting.pop(msg.subject).set_result(time.perf_counter_ns())

    sub = await nc.subscribe(inbox + ".*", cb=on_result)
    figure = Figure("raw JetStream work-queue round trip, sequential")
    pipe = Figure(f"raw JetStream work-queue round trip, {IN_FLIGHT} in flight")
    sent = itertools.count()

    async def one(i: int) -> int:
        subject = f"{inbox}.{i}"
        arrived: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiting[subject] = arrived
        started = time.perf_counter_ns()
        await js.publish("rawbench.work.task", body, headers={"Reply-To": subject})
        return await asyncio.wait_for(arrived, 5) - started

    try:
        for i in range(sizes.warmup):
            await one(i)
        async with metered(bench.fleet, figure, bench.monitor):
            for i in range(sizes.wq_seq):
                figure.latencies.append(await one(sizes.warmup + i))
        print(figure.line(), flush=True)

        async def call() -> int:
            return await one(sizes.warmup + sizes.wq_seq + next(sent))

        async with metered(bench.fleet, pipe, bench.monitor):
            await in_flight(call, sizes.wq_pipe, pipe)
        print(pipe.line(), flush=True)
    finally:
        stop.set()
        await work
        await sub.unsubscribe()
        await psub.unsubscribe()
        await js.delete_stream("RAWWORK")
    return [figure, pipe]


# the Chorus system


class Sightings:
    """Instances seen heartbeating, and instances the coordinator has announced as up."""

    def __init__(self) -> None:
        self.beating: set[str] = set()
        self.up: set[str] = set()
        self._news = asyncio.Event()

    async def on_heartbeat(self, msg: Msg) -> None:
        beat = decode(msg.data, Heartbeat)
        if beat.state == "ready":
            self.beating.add(beat.instance)
            self._news.set()

    async def on_status(self, msg: Msg) -> None:
        change = decode(msg.data, AgentStatusChange)
        if change.health == "up":
            self.up.add(change.instance)
            self._news.set()

    async def until_routable(self, instances: set[str], children: list[Child]) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not instances <= (self.beating & self.up):
            for child in children:
                child.check_alive()
            self._news.clear()
            left = deadline - time.monotonic()
            try:
                await asyncio.wait_for(self._news.wait(), max(left, 0.0) or 0.001)
            except TimeoutError:
                missing = instances - (self.beating & self.up)
                raise RuntimeError(f"not routable within {TIMEOUT_S}s: {sorted(missing)}") from None


async def wait_for_coordinator(nc: Client, subjects: Subjects, child: Child) -> Metrics:
    """Ask for metrics until the coordinator answers (it announces nothing when ready)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        child.check_alive()
        try:
            reply = await nc.request(subjects.metrics, b"", timeout=1)
            return decode(reply.data, Metrics)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"coordinator silent for {TIMEOUT_S}s") from None
            await asyncio.sleep(0.1)  # polling: readiness is only visible as an answer


async def chorus_paths(bench: Bench, agents: int, profile: Path | None) -> dict[str, Figure]:
    fleet, sizes = bench.fleet, bench.sizes
    client = ChorusClient(bench.nc, bench.subjects, timeout=TIMEOUT_S)
    queue = TaskQueue(bench.nc, bench.subjects)
    answered: Counter[str] = Counter()

    def task() -> Task:
        return Task(input=INPUT, instructions=INSTRUCTIONS)

    async def direct() -> None:
        result = await client.run_task(task(), capability=CAPABILITY)
        answered[result.instance] += 1

    async def durable() -> None:
        result = await queue.run(task(), capability=CAPABILITY, timeout=DURABLE_TIMEOUT_S)
        answered[result.instance] += 1

    def spies(phase: str) -> dict[str, int]:
        coordinator = fleet.pids["coordinator"][0]
        targets = {"client": os.getpid(), "agent": fleet.pids["agent"][0]}
        if phase == "durable":
            targets["coordinator"] = coordinator
        return targets

    figures: dict[str, Figure] = {}
    label = f"{agents} agent{'s' if agents > 1 else ''}"
    for name, call, seq_n, pipe_n in (
        ("direct", direct, sizes.direct_seq, sizes.direct_pipe),
        ("durable", durable, sizes.durable_seq, sizes.durable_pipe),
    ):
        for _ in range(sizes.warmup):
            await call()
        answered.clear()
        seq = Figure(f"chorus {name}, {label}, sequential")
        async with metered(fleet, seq, bench.monitor):
            seq.latencies = await sequential(call, seq_n)
        print(seq.line(), flush=True)
        answered.clear()
        pipe = Figure(f"chorus {name}, {label}, {IN_FLIGHT} in flight")
        spied = profile if agents > 1 else None
        async with (
            profiled(spied, f"{name}-{agents}agents", spies(name)),
            metered(fleet, pipe, bench.monitor),
        ):
            await in_flight(call, pipe_n, pipe)
        pipe.spread = Counter(answered)
        print(pipe.line(), flush=True)
        figures[f"{name}_seq"] = seq
        figures[f"{name}_pipe"] = pipe
    return figures


async def start_agents(
    count: int,
    fleet: Fleet,
    sightings: Sightings,
    url: str,
    spec: Path,
    workdir: Path,
) -> None:
    started = []
    for _ in range(count):
        instance = f"bencher-{len(fleet.pids.get('agent', [])) + 1}"
        args = ["-m", "chorus", "agent", "run", str(spec), "--instance", instance]
        log = workdir / f"{instance}.log"
        fleet.adopt(await spawn("agent", args, child_env(url, PREFIX), log))
        started.append(instance)
    await sightings.until_routable(set(started), fleet.children)


# the wire trace: which step of a request takes the time

# Every message the server routes, with the kernel's receive time of the TCP segment that
# completed it (SO_TIMESTAMPNS, CLOCK_REALTIME), so the tap's own scheduling delays do not
# move the timestamps. A bare NATS protocol reader: nats-py would hide the socket. One line
# per message, tab-separated, until stdin closes, with the task id from the Chorus-Task-Id
# header or from a tasks-bucket key in the body, and which key (`outcome` or `attempts`).
TAP = r"""
import json, re, selectors, socket, struct, sys
KV_KEY = re.compile(rb"\.(outcome|attempts)\.([A-Za-z0-9_=-]+)")
host, port, out = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "w")
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
sock = socket.create_connection((host, port))
sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
connect = {"verbose": False, "pedantic": False, "headers": True, "name": "tap"}
sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nSUB > 1\r\nPING\r\n")
buffer, ready = b"", False

def parse(stamp):
    global buffer, ready
    while True:
        end = buffer.find(b"\r\n")
        if end < 0:
            return
        head = buffer[:end].split()
        verb = head[0] if head else b""
        if verb in (b"MSG", b"HMSG"):
            size = int(head[-1])
            if len(buffer) < end + 2 + size + 2:
                return
            body = buffer[end + 2 : end + 2 + size]
            buffer = buffer[end + 2 + size + 2 :]
            reply = head[3] if len(head) == (5 if verb == b"MSG" else 6) else b""
            status, task, hint = "", "", ""
            if verb == b"HMSG":
                lines = body[: int(head[-2])].split(b"\r\n")
                first = lines[0].split()
                status = first[1].decode() if len(first) > 1 else ""
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"chorus-task-id":
                        task = value.strip().decode()
            key = KV_KEY.search(head[1]) or KV_KEY.search(body)
            if key:
                hint, task = key.group(1).decode(), key.group(2).decode()
            row = (stamp, head[1].decode(), reply.decode(), status, task, hint)
            out.write("\t".join(map(str, row)) + "\n")
            continue
        buffer = buffer[end + 2 :]
        if verb == b"PING":
            sock.sendall(b"PONG\r\n")
        elif verb == b"PONG" and not ready:
            ready = True
            print("ready", flush=True)

selector = selectors.DefaultSelector()
selector.register(sock, selectors.EVENT_READ)
selector.register(sys.stdin, selectors.EVENT_READ)
while True:
    for key, _ in selector.select():
        if key.fileobj is sys.stdin:
            if not sys.stdin.readline():
                out.close()
                sys.exit(0)
            continue
        data, ancillary, _, _ = sock.recvmsg(1 << 20, 1024)
        if not data:
            sys.exit("server closed the connection")
        stamp = 0
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanos = struct.unpack("qq", value[:16])
                stamp = seconds * 1_000_000_000 + nanos
        buffer += data
        parse(stamp)
"""


@dataclass(frozen=True)
class Wire:
    """One message as the tap saw it."""

    at: int  # time_ns (CLOCK_REALTIME), when the kernel received it
    subject: str
    reply: str
    status: str
    task: str
    hint: str


@contextlib.asynccontextmanager
async def tapped(url: str, out: Path) -> AsyncIterator[list[Wire]]:
    """Run the tap for the block; the list is filled with what it saw once the block ends."""
    seen: list[Wire] = []
    host, _, port = url.removeprefix("nats://").rpartition(":")
    tap = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        TAP,
        host,
        port,
        str(out),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert tap.stdin is not None and tap.stdout is not None
    await asyncio.wait_for(tap.stdout.readline(), TIMEOUT_S)
    try:
        yield seen
    finally:
        await asyncio.sleep(0.2)  # the last messages of the last request are still on the way
        tap.stdin.close()
        await asyncio.wait_for(tap.wait(), TIMEOUT_S)
    seen.extend(read_wire(out))


def read_wire(path: Path) -> list[Wire]:
    wire = []
    for line in path.read_text().splitlines():
        at, subject, reply, status, task, hint = line.split("\t")
        wire.append(Wire(int(at), subject, reply, status, task, hint))
    return wire


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


def durable_points(subjects: Subjects, task_id: str) -> Points:
    dispatch = subjects.dispatch(f"cap.{CAPABILITY}")
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


def median_us(values: list[int]) -> float:
    return sorted(values)[len(values) // 2] / 1000


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


async def trace(bench: Bench, n: int) -> list[Traced]:
    """One request at a time of each kind under the tap; the median of every step."""
    nc, server, subjects, workdir = bench.nc, bench.server, bench.subjects, bench.workdir
    client = ChorusClient(nc, subjects, timeout=TIMEOUT_S)
    queue = TaskQueue(nc, subjects)
    body = encode(Task(input=INPUT, instructions=INSTRUCTIONS, task_id="t-0001"))

    async def raw() -> str:
        await nc.request("bench.xecho", body, timeout=5)
        return ""

    async with responder(bench):
        wire, marks = await traced_calls(server.url, workdir, "raw", raw, n)

    results = [
        read_timelines(
            Traced("raw request-reply", RAW_CHAIN),
            wire,
            marks,
            lambda _: request_points("bench.xecho"),  # raw requests carry no task id
        )
    ]

    async def direct() -> str:
        task = Task(input=INPUT, instructions=INSTRUCTIONS)
        await client.run_task(task, capability=CAPABILITY)
        return task.task_id

    wire, marks = await traced_calls(server.url, workdir, "direct", direct, n)
    subject = subjects.capability_task(CAPABILITY)
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
        await queue.run(task, capability=CAPABILITY, timeout=DURABLE_TIMEOUT_S)
        return task.task_id

    wire, marks = await traced_calls(server.url, workdir, "durable", durable, n)
    results.append(
        read_timelines(
            Traced("chorus durable `TaskQueue.run`", DURABLE_CHAIN, DURABLE_SIDE),
            wire,
            marks,
            lambda ident: durable_points(subjects, ident),
        )
    )
    return results


# reporting


def print_warnings(workdir: Path) -> None:
    """The warnings and errors the services logged (JSON lines), to explain a failed run."""
    for log in sorted(workdir.glob("*.log")):
        if log.name == "nats-server.log":
            continue
        lines = [
            line
            for line in log.read_text(errors="replace").splitlines()
            if '"level": "info"' not in line and '"level": "debug"' not in line
        ]
        if lines:
            print(f"\n--- {log.name}: {len(lines)} lines above info ---", file=sys.stderr)
            print("\n".join(lines[-30:]), file=sys.stderr)


def ratio_row(
    label: str, raw: float, ones: float, fours: float, target: str, unit: str
) -> list[str]:
    def cell(value: float) -> str:
        return f"{value:,.0f} {unit}"

    r1, r4 = ones / raw, fours / raw
    if unit == "req/s":
        met = r4 >= TARGET_THROUGHPUT_SHARE
        shown = [f"{r1:.0%}", f"{r4:.0%}"]
    else:
        met = max(r1, r4) <= TARGET_LATENCY_RATIO
        shown = [f"{r1:.2f}x", f"{r4:.2f}x"]
    verdict = "" if not target else "met" if met else "MISSED"
    return [label, cell(raw), cell(ones), shown[0], cell(fours), shown[1], target or "—", verdict]


def summary(raw: dict[str, Figure], one: dict[str, Figure], four: dict[str, Figure]) -> str:
    rr, rr_pipe, wq = raw["rr_seq"], raw["rr_pipe"], raw["wq_seq"]
    assert rr_pipe.rate is not None
    rows = [
        ratio_row(
            "direct `run_task` p50 vs raw request-reply p50",
            rr.p50,
            one["direct_seq"].p50,
            four["direct_seq"].p50,
            "≤ 1.5x",
            "us",
        ),
        ratio_row(
            "direct `run_task` p99 vs raw request-reply p99",
            rr.p99,
            one["direct_seq"].p99,
            four["direct_seq"].p99,
            "",
            "us",
        ),
        ratio_row(
            "durable `TaskQueue.run` p50 vs raw work-queue p50",
            wq.p50,
            one["durable_seq"].p50,
            four["durable_seq"].p50,
            "≤ 1.5x",
            "us",
        ),
        ratio_row(
            "durable `TaskQueue.run` p99 vs raw work-queue p99",
            wq.p99,
            one["durable_seq"].p99,
            four["durable_seq"].p99,
            "",
            "us",
        ),
    ]
    for name in ("direct", "durable"):
        ones, fours = one[f"{name}_pipe"].rate, four[f"{name}_pipe"].rate
        assert ones is not None and fours is not None
        rows.append(
            ratio_row(
                f"{name}, {IN_FLIGHT} in flight, vs raw request-reply {IN_FLIGHT} in flight",
                rr_pipe.rate,
                ones,
                fours,
                "≥ 50% (4 agents)",
                "req/s",
            )
        )
    # Not a target: the durable path against the raw path of its own kind.
    wq_pipe, ones, fours = raw["wq_pipe"].rate, one["durable_pipe"].rate, four["durable_pipe"].rate
    assert wq_pipe is not None and ones is not None and fours is not None
    rows.append(
        ratio_row(
            f"durable, {IN_FLIGHT} in flight, vs raw work queue {IN_FLIGHT} in flight",
            wq_pipe,
            ones,
            fours,
            "",
            "req/s",
        )
    )
    header = ["measure", "raw", "1 agent", "ratio", "4 agents", "ratio", "target", ""]
    return markdown_table(header, rows)


def cost_table(figures: list[Figure]) -> str:
    roles = ["client", "nats-server", "coordinator", "agent", "responder", "other"]
    present = [r for r in roles if any(r in f.cpu for f in figures)]
    rows = []
    for f in figures:
        msgs = f.msgs_per_request
        rows.append(
            [
                f.label,
                f"{f.cpu_us_per_request:.0f}" if f.cpu_us_per_request is not None else "",
                f"{msgs[0]:.1f} / {msgs[1]:.1f}" if msgs else "",
                *(f"{f.cpu[r]:.0f}%" if r in f.cpu else "" for r in present),
            ]
        )
    header = ["phase", "CPU us/request", "server msgs in / out per request"]
    return markdown_table(header + [f"{r} CPU" for r in present], rows)


async def run(sizes: Sizes, workdir: Path, profile: Path | None, traced_n: int) -> None:
    monitor_port = free_port()
    server = NatsServer(
        workdir / "jetstream", monitor_port=monitor_port, log_file=workdir / "nats-server.log"
    ).start()
    assert server.pid is not None
    settings = Settings(nats_url=server.url, prefix=PREFIX)
    subjects = settings.subjects
    nc = await connect(settings, "bench")
    fleet = Fleet({"client": [os.getpid()], "nats-server": [server.pid]})
    bench = Bench(nc, server, f"http://127.0.0.1:{monitor_port}", fleet, sizes, workdir, subjects)
    try:
        binary = subprocess.run([find_binary(), "--version"], capture_output=True, text=True)
        print(
            f"# {binary.stdout.strip()}, nats-py {version('nats-py')}, msgspec "
            f"{version('msgspec')}, Python {platform.python_version()}, {os.cpu_count()} cpus",
            flush=True,
        )
        raw: dict[str, Figure] = {}
        raw["rr_seq"], raw["rr_pipe"] = await raw_request_reply(bench)
        raw["wq_seq"], raw["wq_pipe"] = await raw_work_queue(bench)

        sightings = Sightings()
        await nc.subscribe(subjects.all_heartbeats, cb=sightings.on_heartbeat)
        await nc.subscribe(subjects.all_status, cb=sightings.on_status)
        await nc.flush(timeout=5)
        env = child_env(server.url, PREFIX)
        log = workdir / "coordinator.log"
        coordinator = fleet.adopt(
            await spawn("coordinator", ["-m", "chorus", "coordinator"], env, log)
        )
        await wait_for_coordinator(nc, subjects, coordinator)
        spec = workdir / "bencher.yaml"
        spec.write_text(SPEC)
        await start_agents(1, fleet, sightings, server.url, spec, workdir)
        one = await chorus_paths(bench, 1, profile)
        await start_agents(3, fleet, sightings, server.url, spec, workdir)
        four = await chorus_paths(bench, 4, profile)
        traced = await trace(bench, traced_n) if traced_n else []
        metrics = await nc.request(subjects.metrics, b"", timeout=5)
        counts = decode(metrics.data, Metrics)
        print(
            f"\ncoordinator: {counts.completed_tasks} completed, {counts.failed_tasks} failed, "
            f"{counts.retried_tasks} retried",
            flush=True,
        )
    except BaseException:
        print_warnings(workdir)
        raise
    finally:
        await fleet.stop()
        await nc.close()
        server.stop()
    print_warnings(workdir)
    print("\n## Ratios against raw nats-py (same run)\n")
    print(summary(raw, one, four))
    print("\n## Cost per request (CPU of every process of the run; messages through the server)\n")
    print(cost_table([*raw.values(), *one.values(), *four.values()]), flush=True)
    if traced:
        print("\n## Where a request's time goes (4 agents; wire times seen by a tap process)\n")
        for kind in traced:
            print(kind.table() + "\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny run, well under a minute")
    parser.add_argument("--profile", type=Path, help="py-spy the 4-agent throughput phases here")
    parser.add_argument(
        "--trace", type=int, help="requests of each kind in the traced round (0: none)"
    )
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else DEFAULT
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chorus-routing-") as tmp:
        traced_n = args.trace if args.trace is not None else sizes.traced
        asyncio.run(run(sizes, Path(tmp), args.profile, traced_n))


if __name__ == "__main__":
    main()
