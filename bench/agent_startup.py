"""Start-up time and idle memory of one agent process, `python -m chorus agent run SPEC`.

For each case a fresh process is started against an embedded nats-server and measured:

- first heartbeat: from `Popen` to its first `ready` heartbeat on `<prefix>.hb.<instance>`;
- first answer: from `Popen` to the reply to a `Task` sent on `<prefix>.agent.<instance>.task`
  (sent as soon as the heartbeat arrives; the endpoints exist before the first heartbeat);
- memory once ready and idle (sampled after the next heartbeat): VmRSS, VmHWM (peak) and
  RssAnon (heap, as opposed to mapped files) from /proc/<pid>/status;
- stop: from SIGTERM to exit (the drain).

References measured in the same run: bare `python`, `import nats, msgspec` and
`import nats, msgspec, openai` (time from start to exit, and memory at exit).

    python -m bench.agent_startup            # 5 runs of each case, medians; about 20 s
    python -m bench.agent_startup --smoke    # 1 run of each; about 5 s
    python -m bench.agent_startup --imports  # also: which imports cost the time and memory

Numbers are printed, never asserted. When a target is missed the import breakdown is printed
as well (the agent run once more under an import probe): per package the time and resident
memory its modules add (like `-X importtime`, with memory), and the Chorus module that first
imports it; then the imports Chorus code makes, heaviest first (`bench.agent_imports`). The
agent processes run the code of this checkout (`PYTHONPATH` is its `shared/` and root).
Linux only (memory is read from /proc/<pid>/status).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.agent_imports import IMPORT_PROBE, ImportProfile, breakdown, mib, read_profile
from bench.harness import cli
from bench.harness.fleet import ROOT, child_env, free_port, tail
from bench.harness.profile import parse_status, proc_status
from bench.harness.stats import median, spread
from bench.harness.tables import environment_lines, markdown_table
from chorus.config import Settings
from chorus.messages import Heartbeat, Result, Task, decode, decode_result, encode
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer
from chorus.specs.agent import load_spec
from chorus.subjects import Subjects

SPEC = ROOT / "shared" / "chorus" / "examples" / "agents" / "researcher.yaml"
OPENAI_MODEL = "openai:gpt-5-mini"
HEARTBEAT_INTERVAL_S = 0.5  # only decides how long "wait for the next heartbeat" takes
AGENT_ENV = {"CHORUS_HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL_S)}
TIMEOUT_S = 30.0

# Targets from the foundation issue (MiB, seconds).
TARGET_OFFLINE_RSS_MIB = 35.0
TARGET_OFFLINE_READY_S = 1.0
TARGET_OPENAI_RSS_MIB = 60.0

STATUS_PROGRAM = "print(open('/proc/self/status').read())"
REFERENCES: dict[str, str] = {
    "python (bare)": f"import os; {STATUS_PROGRAM}",
    "import nats, msgspec": f"import nats, msgspec, os; {STATUS_PROGRAM}",
    "import nats, msgspec, openai": f"import nats, msgspec, openai, os; {STATUS_PROGRAM}",
}


@dataclass
class AgentSample:
    first_heartbeat_s: float
    first_answer_s: float | None
    status: dict[str, int]  # /proc/<pid>/status fields in kB
    stop_s: float


@dataclass
class ReferenceSample:
    exit_s: float
    status: dict[str, int]


@dataclass
class Case:
    """One way of starting an agent process."""

    label: str
    spec: Path
    env: dict[str, str]
    ask: bool  # send a task once ready
    fails: bool = False  # the task is expected to get an error reply
    samples: list[AgentSample] = field(default_factory=list)


def unused_local_url() -> str:
    """An http URL on a local port nothing listens on (bound, then released)."""
    return f"http://127.0.0.1:{free_port()}/v1"


def agent_args(spec: Path, instance: str) -> list[str]:
    """The arguments of `chorus` that run one agent instance."""
    return ["agent", "run", str(spec), "--instance", instance]


class HeartbeatWatch:
    """Records when each `ready` heartbeat of one instance arrives (perf_counter time)."""

    def __init__(self) -> None:
        self.times: asyncio.Queue[float] = asyncio.Queue()

    async def on_message(self, msg: Msg) -> None:
        arrived = time.perf_counter()
        if decode(msg.data, Heartbeat).state == "ready":
            self.times.put_nowait(arrived)

    async def next(self, process: asyncio.subprocess.Process, log: Path) -> float:
        """The next heartbeat's arrival time; fail with the agent's log if it exits first."""
        beat = asyncio.ensure_future(self.times.get())
        exited = asyncio.ensure_future(process.wait())
        try:
            done, _ = await asyncio.wait(
                {beat, exited}, timeout=TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in (beat, exited):
                waiter.cancel()
        if beat in done:
            return beat.result()
        why = f"exited with {process.returncode}" if exited in done else f"silent {TIMEOUT_S}s"
        raise RuntimeError(f"agent {why}; its log:\n{tail(log)}")

    def clear(self) -> None:
        while not self.times.empty():
            self.times.get_nowait()


async def terminate(process: asyncio.subprocess.Process) -> float:
    """SIGTERM and wait for the exit; seconds it took."""
    started = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"agent did not exit within {TIMEOUT_S}s of SIGTERM") from None
    return time.perf_counter() - started


@dataclass
class RunningAgent:
    """An agent process started by `running_agent`, and what the bench sees of it."""

    process: asyncio.subprocess.Process
    started: float  # perf_counter just before the process was created
    nc: Client
    subjects: Subjects
    instance: str
    watch: HeartbeatWatch
    log: Path

    async def next_heartbeat(self) -> float:
        """Seconds from the start to the next `ready` heartbeat."""
        return await self.watch.next(self.process, self.log) - self.started

    async def ask(self, fails: bool) -> float:
        """Send a task to the instance; seconds from the start to its reply."""
        task = Task(input="What makes NATS a good fit for agent systems?")
        reply = await self.nc.request(
            self.subjects.agent_task(self.instance), encode(task), timeout=TIMEOUT_S
        )
        answered = time.perf_counter() - self.started
        answer = decode_result(reply.data)
        if isinstance(answer, Result) == fails:
            raise RuntimeError(f"unexpected reply to the task: {answer}")
        return answered

    async def stop(self) -> float:
        """SIGTERM; seconds to a clean exit."""
        seconds = await terminate(self.process)
        if self.process.returncode != 0:
            raise RuntimeError(f"agent exited with {self.process.returncode}:\n{tail(self.log)}")
        return seconds


@contextlib.asynccontextmanager
async def running_agent(
    case: Case, nats_url: str, workdir: Path, python_args: list[str], env: dict[str, str]
) -> AsyncIterator[RunningAgent]:
    """`python <python_args> agent run SPEC --instance ID`, watched from its first heartbeat.

    The heartbeat subscription exists before the process does, so no heartbeat is missed; the
    process is killed if it is still running on the way out.
    """
    prefix = f"b{uuid.uuid4().hex[:8]}"
    # Instance ids are `<agent name>-<suffix>` (the subjects carry the agent name).
    instance = f"{load_spec(case.spec).name}-{uuid.uuid4().hex[:8]}"
    subjects = Subjects(prefix)
    log = workdir / f"{instance}.log"
    nc: Client = await connect(Settings(nats_url=nats_url, prefix=prefix), "bench")
    watch = HeartbeatWatch()
    try:
        await nc.subscribe(subjects.heartbeat(instance), cb=watch.on_message)
        await nc.flush(timeout=5)
        with log.open("wb") as sink:
            started = time.perf_counter()
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                *python_args,
                *agent_args(case.spec, instance),
                env=child_env(nats_url, prefix, {**AGENT_ENV, **case.env, **env}),
                stdout=sink,
                stderr=sink,
            )
        try:
            yield RunningAgent(process, started, nc, subjects, instance, watch, log)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    finally:
        await nc.close()


async def measure_agent(case: Case, nats_url: str, workdir: Path) -> AgentSample:
    async with running_agent(case, nats_url, workdir, ["-m", "chorus"], {}) as agent:
        first_heartbeat = await agent.next_heartbeat()
        first_answer = await agent.ask(case.fails) if case.ask else None
        # Idle: let the process finish whatever the start-up or the task left behind.
        agent.watch.clear()
        await agent.next_heartbeat()
        status = proc_status(agent.process.pid)
        stop_s = await agent.stop()
    return AgentSample(first_heartbeat, first_answer, status, stop_s)


async def measure_reference(code: str) -> ReferenceSample:
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), TIMEOUT_S)
    exit_s = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"reference {code!r} exited with {process.returncode}")
    return ReferenceSample(exit_s, parse_status(out.decode()))


def openai_spec(directory: Path) -> Path:
    """The researcher spec with an OpenAI model."""
    raw = yaml.safe_load(SPEC.read_text())
    raw["model"] = OPENAI_MODEL
    path = directory / "researcher-openai.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def build_cases(workdir: Path) -> list[Case]:
    openai_env = {
        "OPENAI_API_KEY": "dummy",
        "OPENAI_BASE_URL": unused_local_url(),
        "CHORUS_OPENAI_MAX_RETRIES": "0",  # the failed request below answers at once
    }
    spec = openai_spec(workdir)
    return [
        Case("offline model", SPEC, {}, ask=True),
        Case(f"{OPENAI_MODEL}, idle", spec, openai_env, ask=False),
        # A task that fails at once (nothing listens at OPENAI_BASE_URL): the memory of an
        # OpenAI agent whose client has made a request (connection pool, response types).
        Case(f"{OPENAI_MODEL}, after 1 failed call", spec, openai_env, ask=True, fails=True),
    ]


async def run_rounds(
    cases: list[Case],
    references: dict[str, list[ReferenceSample]],
    runs: int,
    nats_url: str,
    workdir: Path,
) -> None:
    # Round-robin, so drift on a shared machine touches every case alike.
    for round_no in range(1, runs + 1):
        for case in cases:
            case.samples.append(await measure_agent(case, nats_url, workdir))
        for label, code in REFERENCES.items():
            references[label].append(await measure_reference(code))
        print(f"  round {round_no}/{runs} done", file=sys.stderr)


# reporting


def seconds(value: float) -> str:
    return f"{value:.3f}"


def megabytes(value: float) -> str:
    return f"{value:.1f}"


def agent_table(cases: list[Case]) -> str:
    rows = []
    for case in cases:
        s = case.samples
        answers = [x.first_answer_s for x in s if x.first_answer_s is not None]
        rows.append(
            [
                case.label,
                spread([x.first_heartbeat_s for x in s], seconds),
                spread(answers, seconds),
                spread([mib(x.status["VmRSS"]) for x in s], megabytes),
                spread([mib(x.status["VmHWM"]) for x in s], megabytes),
                spread([mib(x.status.get("RssAnon", 0)) for x in s], megabytes),
                spread([x.stop_s for x in s], seconds),
            ]
        )
    header = [
        "agent process",
        "first heartbeat s",
        "first answer s",
        "VmRSS MiB",
        "VmHWM MiB",
        "RssAnon MiB",
        "SIGTERM→exit s",
    ]
    return markdown_table(header, rows)


def reference_table(references: dict[str, list[ReferenceSample]]) -> str:
    rows = [
        [
            label,
            spread([x.exit_s for x in s], seconds),
            spread([mib(x.status["VmRSS"]) for x in s], megabytes),
            spread([mib(x.status["VmHWM"]) for x in s], megabytes),
            spread([mib(x.status.get("RssAnon", 0)) for x in s], megabytes),
        ]
        for label, s in references.items()
    ]
    header = ["reference `python -c`", "start→exit s", "VmRSS MiB", "VmHWM MiB", "RssAnon MiB"]
    return markdown_table(header, rows)


def target_lines(cases: list[Case]) -> tuple[list[str], bool]:
    offline, openai_idle = cases[0].samples, cases[1].samples
    checks = [
        (
            f"offline: VmRSS idle ≤ {TARGET_OFFLINE_RSS_MIB:g} MiB",
            median([mib(x.status["VmRSS"]) for x in offline]),
            TARGET_OFFLINE_RSS_MIB,
            "MiB",
        ),
        (
            f"offline: ready (heartbeat and answer) ≤ {TARGET_OFFLINE_READY_S:g} s",
            median([max(x.first_heartbeat_s, x.first_answer_s or 0.0) for x in offline]),
            TARGET_OFFLINE_READY_S,
            "s",
        ),
        (
            f"{OPENAI_MODEL}: VmRSS idle ≤ {TARGET_OPENAI_RSS_MIB:g} MiB",
            median([mib(x.status["VmRSS"]) for x in openai_idle]),
            TARGET_OPENAI_RSS_MIB,
            "MiB",
        ),
    ]
    lines, all_met = [], True
    for label, value, target, unit in checks:
        met = value <= target
        all_met &= met
        lines.append(f"- {label}: median {value:.3f} {unit} — {'met' if met else 'MISSED'}")
    return lines, all_met


# import breakdown


async def profile_imports(case: Case, nats_url: str, workdir: Path) -> ImportProfile:
    """Run the agent under the import probe until it has answered (or is ready), then stop it."""
    out = workdir / f"imports-{uuid.uuid4().hex[:8]}.json"
    probe = ["-c", IMPORT_PROBE]
    async with running_agent(
        case, nats_url, workdir, probe, {"CHORUS_BENCH_IMPORTS": str(out)}
    ) as agent:
        await agent.next_heartbeat()
        if case.ask:
            await agent.ask(case.fails)
        await agent.stop()
    return read_profile(out)


async def import_breakdown(case: Case, nats_url: str, workdir: Path, top: int) -> str:
    return breakdown(case.label, await profile_imports(case, nats_url, workdir), top)


# main


async def main_async(args: argparse.Namespace, workdir: Path) -> None:
    runs = 1 if args.smoke else args.repeat or 5
    with NatsServer(workdir / "jetstream") as server:
        cases = build_cases(workdir)
        references: dict[str, list[ReferenceSample]] = {label: [] for label in REFERENCES}
        await run_rounds(cases, references, runs, server.url, workdir)
        command = f"python -m bench.agent_startup --runs {runs}"
        packages = ("nats-py", "msgspec", "openai", "PyYAML")
        print("\n".join(environment_lines(command, packages)))
        print(f"- figures are medians (min-max) of {runs} run(s)")
        print()
        print(agent_table(cases))
        print()
        print(reference_table(references))
        print()
        targets, all_met = target_lines(cases)
        print("Targets:")
        print("\n".join(targets))
        if args.imports or not all_met:
            for case in cases[:2]:
                print()
                print(await import_breakdown(case, server.url, workdir, args.top))


def main() -> int:
    parser = cli.parser("bench.agent_startup", __doc__, repeat="runs of each case (default 5)")
    parser.add_argument(
        "--imports",
        action="store_true",
        help="print the import breakdown even when every target is met",
    )
    parser.add_argument("--top", type=int, default=12, help="rows of the import breakdown")
    return cli.run(main_async, parser.parse_args(), "chorus-bench-")


if __name__ == "__main__":
    raise SystemExit(main())
