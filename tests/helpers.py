"""Helpers for tests: kinds of the fixtures' callables, child processes, spec files.

Fixtures live in conftest.py; what tests import lives here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.config import Settings
from chorus.messages import Heartbeat, decode

if TYPE_CHECKING:
    from chorus.agent.host import AgentHost
    from chorus.coordinator.service import Coordinator
    from chorus.orchestrator.service import Orchestrator

ROOT = Path(__file__).resolve().parent.parent

StartCoordinator = Callable[..., Awaitable["Coordinator"]]
StartOrchestrator = Callable[..., Awaitable["Orchestrator"]]
StartHost = Callable[..., Awaitable["AgentHost"]]
Reap = Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]]


class AgentProcess:
    """`chorus agent run SPEC` as a real child process."""

    def __init__(self, process: subprocess.Popen[bytes], instance: str, log: Path) -> None:
        self.process = process
        self.instance = instance
        self.log = log

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.log.read_text()


def child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "NATS_URL": settings.nats_url,
            "CHORUS_PREFIX": settings.prefix,
            "CHORUS_HEARTBEAT_INTERVAL": str(settings.heartbeat_interval),
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


SpawnAgent = Callable[..., Awaitable[AgentProcess]]


def stop_child(process: subprocess.Popen[bytes], timeout: float = 20) -> int | None:
    """SIGTERM and wait; None (after a SIGKILL) when it did not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


def write_spec(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


async def first_busy_instance(nc: Client, settings: Settings) -> asyncio.Future[str]:
    """A future for the first instance whose heartbeat says it has a task in flight."""
    busy: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_beat(msg: Msg) -> None:
        beat = decode(msg.data, Heartbeat)
        if beat.in_flight and not busy.done():
            busy.set_result(beat.instance)

    await nc.subscribe(settings.subjects.all_heartbeats, cb=on_beat)
    return busy
