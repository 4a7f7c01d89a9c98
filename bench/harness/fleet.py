"""The processes of a benchmark run: an embedded nats-server, and Chorus services started
as real child processes (`python -m chorus coordinator | orchestrator | agent run`), as in
production, with the environment that points them at the server and at this checkout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.harness.profile import cpu_by_role
from chorus.config import Settings
from chorus.messages import AgentStatusChange, Heartbeat, Metrics, decode
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer
from chorus.subjects import Subjects

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 30.0  # to start, to become routable, to stop before being killed


def child_env(nats_url: str, prefix: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with the server, the subject prefix, and the code of this
    checkout first on the path (whatever the venv's editable install points at)."""
    env = dict(os.environ)
    env.update(
        {
            "NATS_URL": nats_url,
            "CHORUS_PREFIX": prefix,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "shared"), str(ROOT)]),
        }
    )
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


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


@dataclass
class Child:
    """A `python ...` child process, its role and its log."""

    role: str
    process: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise RuntimeError(
                f"{self.role} exited with {self.process.returncode}:\n{tail(self.log)}"
            )

    async def stop(self) -> None:
        """SIGTERM (services drain), then SIGKILL if it is still there after TIMEOUT_S."""
        if self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), TIMEOUT_S)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def spawn(role: str, args: list[str], env: dict[str, str], log: Path) -> Child:
    """`python ARGS`, its output appended to `log`."""
    with log.open("ab") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *args, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    return Child(role, process, log)


@dataclass
class Fleet:
    """Every process of the run by role (so a phase can tell where the CPU went), the bench
    process's connection, and the Chorus services it started."""

    server: NatsServer
    nc: Client
    settings: Settings
    workdir: Path
    agent_role: str = "agents"
    pids: dict[str, list[int]] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)  # agent instances, in start order

    @property
    def subjects(self) -> Subjects:
        return self.settings.subjects

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def monitor(self) -> str | None:
        port = self.server.monitor_port
        return f"http://127.0.0.1:{port}" if port else None

    @property
    def env(self) -> dict[str, str]:
        return child_env(self.url, self.settings.prefix)

    def add(self, role: str, pid: int) -> None:
        self.pids.setdefault(role, []).append(pid)

    def adopt(self, child: Child) -> Child:
        self.children.append(child)
        self.add(child.role, child.pid)
        return child

    def pid(self, role: str) -> int:
        return self.pids[role][0]

    def check_alive(self) -> None:
        for child in self.children:
            child.check_alive()

    def snapshot(self) -> dict[str, float]:
        """CPU seconds so far by role; `other` is every process outside the run (noise)."""
        return cpu_by_role(self.pids)

    async def start(self, role: str, args: list[str], log_name: str) -> Child:
        return self.adopt(await spawn(role, args, self.env, self.workdir / log_name))

    async def stop(self, role: str | None = None) -> None:
        chosen = [c for c in self.children if role is None or c.role == role]
        await asyncio.gather(*(c.stop() for c in chosen))
        for child in chosen:
            self.children.remove(child)
            self.pids[child.role].remove(child.pid)

    async def start_coordinator(self) -> Child:
        """`chorus coordinator`, returned once it answers a metrics request."""
        child = await self.start("coordinator", ["-m", "chorus", "coordinator"], "coordinator.log")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            child.check_alive()
            try:
                reply = await self.nc.request(self.subjects.metrics, b"", timeout=1)
                decode(reply.data, Metrics)
                return child
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"coordinator silent for {TIMEOUT_S}s") from None
                await asyncio.sleep(0.1)  # polling: readiness is only visible as an answer

    async def start_orchestrator(self, direct: bool) -> Child:
        """`chorus orchestrator [--direct]`, in place of the one running. It announces
        nothing when ready: a first run submitted waits in the runs queue until it is."""
        await self.stop("orchestrator")
        args = ["-m", "chorus", "orchestrator"] + (["--direct"] if direct else [])
        log = f"orchestrator-{'direct' if direct else 'durable'}.log"
        return await self.start("orchestrator", args, log)

    async def add_agents(self, n: int, spec: Path) -> list[str]:
        """Start n `chorus agent run SPEC` processes; return their instance names once each
        has sent a `ready` heartbeat and the coordinator has announced it `up`."""
        names = [f"bencher-{len(self.instances) + i + 1}" for i in range(n)]
        ready: set[str] = set()
        up: set[str] = set()
        news = asyncio.Event()

        async def on_heartbeat(msg: Msg) -> None:
            beat = decode(msg.data, Heartbeat)
            if beat.state == "ready":
                ready.add(beat.instance)
                news.set()

        async def on_status(msg: Msg) -> None:
            change = decode(msg.data, AgentStatusChange)
            if change.health == "up":
                up.add(change.instance)
                news.set()

        subs = [
            await self.nc.subscribe(self.subjects.all_heartbeats, cb=on_heartbeat),
            await self.nc.subscribe(self.subjects.all_status, cb=on_status),
        ]
        await self.nc.flush(timeout=5)
        try:
            for name in names:
                args = ["-m", "chorus", "agent", "run", str(spec), "--instance", name]
                await self.start(self.agent_role, args, f"{name}.log")
            deadline = time.monotonic() + TIMEOUT_S
            while True:
                news.clear()
                missing = set(names) - (ready & up)
                if not missing:
                    break
                self.check_alive()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"not routable within {TIMEOUT_S}s: {sorted(missing)}")
                with contextlib.suppress(TimeoutError):  # wakes to check the children live
                    await asyncio.wait_for(news.wait(), min(left, 1.0))
        finally:
            for sub in subs:
                await sub.unsubscribe()
        self.instances += names
        return names


@contextlib.asynccontextmanager
async def running_fleet(
    workdir: Path, prefix: str, *, self_role: str = "bench", agent_role: str = "agents"
) -> AsyncIterator[Fleet]:
    """An embedded nats-server (JetStream store, log and monitoring port in `workdir`) and a
    connection to it; every child is stopped and the server with them on the way out, and
    the services' warnings are printed if the block fails."""
    server = NatsServer(
        workdir / "jetstream", monitor_port=free_port(), log_file=workdir / "nats-server.log"
    ).start()
    try:
        assert server.pid is not None
        settings = Settings(nats_url=server.url, prefix=prefix)
        nc = await connect(settings, "bench")
        fleet = Fleet(server, nc, settings, workdir, agent_role)
        fleet.add(self_role, os.getpid())
        fleet.add("nats-server", server.pid)
        try:
            yield fleet
        except BaseException:
            print_warnings(workdir)
            raise
        finally:
            await fleet.stop()
            await nc.close()
    finally:
        server.stop()
