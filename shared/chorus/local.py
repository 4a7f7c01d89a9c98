"""A whole Chorus system on one machine: an embedded nats-server and services as child processes.

Used by `chorus up` and `chorus demo`. Each service is a separate OS process started with the
same Python, so what runs here is what runs in containers. With `auth` (the default of both),
the server runs the config `chorus.auth.init_auth` writes into DATA_DIR/auth and each child
connects as its own principal, with only that principal's permissions. The data dir is the
owner's alone (0700, files 0600): it holds the seeds and every process's log.

With `cluster` N > 1 the server is N clustered nats-servers (chorus.nats.cluster, stores under
DATA_DIR/cluster), each serving the same users; every child is given all their URLs and
CHORUS_REPLICAS=N.
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

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.auth import AuthLayout, init_auth
from chorus.auth.principals import agent_principal_name
from chorus.config import MAX_REPLICAS, Settings
from chorus.errors import ConfigError
from chorus.messages import Heartbeat, decode
from chorus.nats.cluster import NatsCluster
from chorus.nats.server import NatsServer
from chorus.specs.agent import AgentSpec
from chorus.subjects import Subjects

log = logging.getLogger("chorus.local")

AUTH_DIR = "auth"
CLUSTER_DIR = "cluster"
# Credentials in the caller's environment must not reach a child that has its own.
CREDENTIAL_VARIABLES = (
    "NATS_USER",
    "NATS_PASSWORD",
    "NATS_TOKEN",
    "NATS_CREDS",
    "NATS_NKEY_SEED",
    "NATS_INBOX_PREFIX",
)


def private_dir(path: Path) -> Path:
    """`path` and its parents made if missing; `path` itself only for its owner (0700)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def private_file(path: Path) -> Path:
    """`path` created if missing, readable only by its owner (0600), for appending."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    os.chmod(path, 0o600)  # O_CREAT's mode applies only to a new file
    return path


def agent_principal(spec: AgentSpec) -> str:
    return agent_principal_name(spec.name)


class LocalSystem:
    """Starts and stops the pieces; `children` are the service processes by name."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 0,
        prefix: str = "chorus",
        agents: list[AgentSpec] | None = None,
        cluster: int = 1,
    ) -> None:
        """`agents`: the specs whose instances will run, for their credentials; None runs
        the system without NATS authorization (`--no-auth`). `cluster`: how many
        nats-servers (1: one server; N: a cluster on ports PORT..PORT+N-1, or free ones when
        `port` is 0), and the replicas of every stream and bucket."""
        if cluster < 1:
            raise ConfigError(f"--cluster {cluster}: a cluster needs at least 1 server")
        self.data_dir = private_dir(data_dir)
        self.prefix = prefix
        self.replicas = min(cluster, MAX_REPLICAS)
        self.auth: AuthLayout | None = None
        if agents is not None:
            self.auth = init_auth(data_dir / AUTH_DIR, agents, prefix=prefix, monitor=None)
        self.cluster: NatsCluster | None = None
        self.servers: dict[str, NatsServer]
        if cluster > 1:
            self.cluster = NatsCluster(
                private_dir(data_dir / CLUSTER_DIR),
                cluster,
                client_ports=[port + i for i in range(cluster)] if port else None,
                auth_include=self.auth.auth_include if self.auth else None,
                log_dir=data_dir,
            )
            self.servers = dict(self.cluster.nodes)
            for node in self.servers.values():
                if node.log_file is not None:
                    private_file(node.log_file)
        else:
            self.servers = {
                "nats-server": NatsServer(
                    data_dir / "jetstream",
                    port=port,
                    log_file=private_file(data_dir / "nats-server.log"),
                    config_file=str(self.auth.server_config) if self.auth else None,
                )
            }
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.commands: dict[str, tuple[str, ...]] = {}
        self.principals: dict[str, str] = {}
        self.restarts: dict[str, int] = {}
        self._next_start: dict[str, float] = {}
        self.stopping = False

    @property
    def server(self) -> NatsServer:
        """The server (the first node of a cluster)."""
        return next(iter(self.servers.values()))

    @property
    def url(self) -> str:
        """Every server's URL, comma-separated."""
        return self.cluster.url if self.cluster else self.server.url

    def start_server(self) -> None:
        """Start the server, or the cluster and wait until it has formed."""
        if self.cluster is not None:
            self.cluster.start()
        else:
            self.server.start()

    def stop_server(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        else:
            self.server.stop()

    def env(self, principal: str = "operator") -> dict[str, str]:
        """The environment of a child that connects as `principal` (when auth is on)."""
        env = dict(os.environ)
        env.update(
            {
                "NATS_URL": self.url,
                "CHORUS_PREFIX": self.prefix,
                "CHORUS_REPLICAS": str(self.replicas),
            }
        )
        if self.auth is not None:
            for variable in CREDENTIAL_VARIABLES:
                env.pop(variable, None)
            env.update(self.auth.environment(principal))
        return env

    def settings_for(self, principal: str, settings: Settings) -> Settings:
        """`settings` that reach this system's server as `principal`."""
        settings = msgspec.structs.replace(
            settings, nats_url=self.url, prefix=self.prefix, replicas=self.replicas
        )
        return self.auth.settings_for(principal, settings) if self.auth else settings

    def spawn(self, name: str, *args: str, principal: str = "operator") -> subprocess.Popen[bytes]:
        """Start `python -m chorus ARGS` as a child connecting as `principal`; its log goes to
        DATA_DIR/logs/NAME.log."""
        logs = private_dir(self.data_dir / "logs")
        with private_file(logs / f"{name}.log").open("ab") as sink:
            child = subprocess.Popen(
                [sys.executable, "-m", "chorus", *args],
                env=self.env(principal),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.children[name] = child
        self.commands[name] = args
        self.principals[name] = principal
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
            self.spawn(name, *self.commands[name], principal=self.principals[name])
            restarted.append(name)
        return restarted

    def supervise_servers(self) -> list[str]:
        """Start again the cluster nodes that exited (the others keep serving meanwhile);
        returns their names. Blocks while a node starts: call it in a thread."""
        if self.cluster is None or self.stopping:
            return []
        restarted = []
        now = time.monotonic()
        for name, node in self.servers.items():
            if not node.exited:
                continue
            due = self._next_start.setdefault(
                name, now + min(30.0, 2.0 ** self.restarts.get(name, 0))
            )
            if now < due:
                continue
            del self._next_start[name]
            self.restarts[name] = self.restarts.get(name, 0) + 1
            log.warning("restarting exited nats-server", extra={"node": name})
            node.stop()  # reaps the dead process
            try:
                node.start()
            except ConfigError as exc:
                log.warning("nats-server did not start", extra={"node": name, "error": str(exc)})
                continue
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
        self.stop_server()


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
