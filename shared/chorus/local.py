"""A whole Chorus system on one machine: an embedded nats-server and services as child processes.

Used by `chorus up` and `chorus demo`. Each service is a separate OS process started with the
same Python, so what runs here is what runs in containers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.messages import Heartbeat, decode
from chorus.nats.server import NatsServer
from chorus.subjects import Subjects

log = logging.getLogger("chorus.local")


class LocalSystem:
    """Starts and stops the pieces; `children` are the service processes by name."""

    def __init__(self, data_dir: Path, *, port: int = 0, prefix: str = "chorus") -> None:
        self.data_dir = data_dir
        self.prefix = prefix
        self.server = NatsServer(
            data_dir / "jetstream", port=port, log_file=data_dir / "nats-server.log"
        )
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.commands: dict[str, tuple[str, ...]] = {}
        self.restarts: dict[str, int] = {}
        self._next_start: dict[str, float] = {}
        self.stopping = False

    @property
    def url(self) -> str:
        return self.server.url

    def start_server(self) -> None:
        self.server.start()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"NATS_URL": self.url, "CHORUS_PREFIX": self.prefix})
        return env

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start `python -m chorus ARGS` as a child; its log goes to DATA_DIR/logs/NAME.log."""
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"{name}.log").open("ab") as sink:
            child = subprocess.Popen(
                [sys.executable, "-m", "chorus", *args],
                env=self.env(),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.children[name] = child
        self.commands[name] = args
        return child

    def supervise(self) -> list[str]:
        """Restart children that exited (backoff 1 s doubling to 30 s); returns their names.

        Call it periodically, like a container runtime's `restart: unless-stopped`.
        """
        restarted = []
        now = time.monotonic()
        for name, child in list(self.children.items()):
            if self.stopping or child.poll() is None:
                continue
            due = self._next_start.setdefault(
                name, now + min(30.0, 2.0 ** self.restarts.get(name, 0))
            )
            if now < due:
                continue
            del self._next_start[name]
            self.restarts[name] = self.restarts.get(name, 0) + 1
            log.warning("restarting exited child", extra={"child": name, "code": child.returncode})
            self.spawn(name, *self.commands[name])
            restarted.append(name)
        return restarted

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every child (they drain), wait, SIGKILL stragglers, then stop the server."""
        self.stopping = True
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for name, child in self.children.items():
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("killing child that did not drain", extra={"child": name})
                child.kill()
                child.wait()
        self.children.clear()
        self.server.stop()


async def wait_for_instances(
    nc: Client, subjects: Subjects, names: dict[str, int], timeout: float
) -> dict[str, set[str]]:
    """Wait until heartbeats show `count` ready instances of each agent name."""
    seen: dict[str, set[str]] = {name: set() for name in names}
    done = asyncio.Event()

    async def on_heartbeat(msg: Msg) -> None:
        hb = decode(msg.data, Heartbeat)
        if hb.name in seen and hb.state == "ready":
            seen[hb.name].add(hb.instance)
        if all(len(seen[n]) >= c for n, c in names.items()):
            done.set()

    sub = await nc.subscribe(subjects.all_heartbeats, cb=on_heartbeat)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await sub.unsubscribe()
    return seen
