"""The processes `bench.chaos` runs and kills: an embedded nats-server on a fixed port with
a JetStream store that outlives it, one coordinator, one orchestrator and N agent processes
(`bench.chaos_agent`), each killed with SIGKILL by pid and started again.

A killed agent comes back as a new instance (a new container would); a killed coordinator,
orchestrator or server comes back as itself, the server on the same port and store dir.
Every fault is recorded with when it was dealt and when its victim was back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nats.errors

from bench.harness.fleet import Child, Fleet, child_env, free_port, print_warnings
from chorus.config import Settings
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer

Kind = Literal["agents", "coordinator", "orchestrator", "server"]
KINDS: tuple[Kind, ...] = ("agents", "coordinator", "orchestrator", "server")
READY_WITHIN_S = 30.0

SPEC = """\
name: bencher
capabilities: [chaos]
max_concurrency: 4
handler: bench.chaos_agent:work
"""


@dataclass
class Fault:
    """One kill: what, which process, when (epoch seconds, the clock the stores use) it was
    killed and when its replacement was ready again."""

    kind: Kind
    victim: str
    killed_at: float
    back_at: float = 0.0


@dataclass
class ChaosFleet(Fleet):
    """A `Fleet` whose children get the chaos run's settings, and that deals faults."""

    extra_env: dict[str, str] = field(default_factory=dict)
    spec: Path = Path()
    down_s: float = 1.0  # how long a killed process (or the server) stays down
    faults: list[Fault] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return child_env(self.url, self.settings.prefix, self.extra_env)

    def _alive(self, role: str) -> list[Child]:
        return [c for c in self.children if c.role == role and c.process.returncode is None]

    async def _kill(self, child: Child) -> None:
        child.process.kill()  # SIGKILL by pid: no drain, no goodbye
        await child.process.wait()
        self.children.remove(child)
        self.pids[child.role].remove(child.pid)

    async def start_orchestrator_ready(self) -> Child:
        """`chorus orchestrator`, returned once its micro service answers a PING."""
        child = await self.start_orchestrator(direct=False)
        ping = f"$SRV.PING.{self.subjects.role_service('orchestrator')}"
        deadline = time.monotonic() + READY_WITHIN_S
        while True:
            child.check_alive()
            try:
                await self.nc.request(ping, b"", timeout=0.5)
                return child
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"orchestrator silent for {READY_WITHIN_S}s") from None
                await asyncio.sleep(0.1)  # polling: readiness is only visible as an answer

    async def deal(self, kind: Kind, rng: random.Random) -> Fault:
        """Kill one process of `kind` with SIGKILL, wait `down_s`, start it again; the fault
        once the replacement is ready."""
        if kind == "server":
            fault = Fault(kind, f"nats-server ({self.server.pid})", time.time())
            self.pids.pop("nats-server", None)
            await asyncio.to_thread(self.server.kill)
            await asyncio.sleep(self.down_s)
            await asyncio.to_thread(self.server.start)
            assert self.server.pid is not None
            self.add("nats-server", self.server.pid)
        else:
            role = self.agent_role if kind == "agents" else kind
            victim = rng.choice(self._alive(role))
            name = Path(victim.log).stem if kind == "agents" else kind
            fault = Fault(kind, f"{name} ({victim.pid})", time.time())
            await self._kill(victim)
            await asyncio.sleep(self.down_s)
            if kind == "agents":
                await self.add_agents(1, self.spec)
            elif kind == "coordinator":
                await self.start_coordinator()
            else:
                await self.start_orchestrator_ready()
        fault.back_at = time.time()
        self.faults.append(fault)
        return fault


@contextlib.asynccontextmanager
async def chaos_fleet(
    workdir: Path, settings_env: dict[str, str], *, agents: int, down_s: float
) -> AsyncIterator[ChaosFleet]:
    """The server, a coordinator, an orchestrator and `agents` agent processes, all ready;
    stopped on the way out (the services' warnings printed if the block failed)."""
    prefix = f"chaos{os.getpid()}"
    server = NatsServer(
        workdir / "jetstream",
        port=free_port(),
        monitor_port=free_port(),
        log_file=workdir / "nats-server.log",
    ).start()
    try:
        assert server.pid is not None
        settings = Settings(nats_url=server.url, prefix=prefix)
        # A service connection: it reconnects for as long as the server is away.
        nc = await connect(settings, "chaos-bench", service=True)
        spec = workdir / "chaos.yaml"
        spec.write_text(SPEC)
        fleet = ChaosFleet(
            server, nc, settings, workdir, extra_env=settings_env, spec=spec, down_s=down_s
        )
        fleet.add("bench", os.getpid())
        fleet.add("nats-server", server.pid)
        try:
            await fleet.start_coordinator()
            await fleet.start_orchestrator_ready()
            await fleet.add_agents(agents, spec)
            yield fleet
        except BaseException:
            print_warnings(workdir)
            raise
        finally:
            await fleet.stop()
            await nc.close()
    finally:
        server.stop()
