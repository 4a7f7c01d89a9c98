"""A cluster of embedded nats-servers with JetStream, for `chorus up --cluster N` and tests.

Each node is a `NatsServer` with its own store dir and a config file written here: its server
name (`n1`..`nN`), a monitoring port on loopback, and a `cluster {}` block whose routes listen
on loopback only and are authenticated with a password generated for this cluster (kept in
the node configs, mode 0600), so no other local process can join as a route and skip client
authorization. With `auth_include` (the accounts file of `chorus auth init`), every node
serves the same nkey users. `start()` returns once the cluster has formed: every node knows
the JetStream meta leader and the leader sees every peer current, so streams with N replicas
can be created at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from chorus.errors import ConfigError
from chorus.nats.server import NatsServer

log = logging.getLogger("chorus.cluster")

CLUSTER_NAME = "chorus"
ROUTE_USER = "route"
FORM_TIMEOUT_S = 30.0
_POLL_S = 0.05  # between looks at /jsz while the cluster forms
_HTTP_TIMEOUT_S = 1.0


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports nothing listens on now (another process may take one before it
    is used: the probes are held until all are chosen, so at least they differ)."""
    with contextlib.ExitStack() as probes:
        ports = []
        for _ in range(count):
            probe = probes.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            probe.bind((host, 0))
            ports.append(int(probe.getsockname()[1]))
        return ports


def node_name(index: int) -> str:
    return f"n{index + 1}"


class NatsCluster:
    """`size` nats-servers routed to each other on `host`. `nodes` by name (`n1`..)."""

    def __init__(
        self,
        directory: str | Path,
        size: int = 3,
        *,
        client_ports: Sequence[int] | None = None,
        host: str = "127.0.0.1",
        name: str = CLUSTER_NAME,
        auth_include: str | Path | None = None,
        log_dir: str | Path | None = None,
        binary: str | None = None,
    ) -> None:
        """`client_ports`: one per node (0: any free port); `auth_include`: a nats-server
        config file every node includes (accounts and users); `log_dir`: each node's log goes
        to LOG_DIR/nats-server-NAME.log."""
        if size < 1:
            raise ConfigError(f"a cluster needs at least one node, got {size}")
        ports = list(client_ports) if client_ports is not None else [0] * size
        if len(ports) != size:
            raise ConfigError(f"{size} nodes need {size} client ports, got {len(ports)}")
        self.directory = Path(directory)
        self.size = size
        self.host = host
        self.name = name
        self.auth_include = Path(auth_include) if auth_include else None
        # Chosen now: every node's routes name the others' before any starts. A node's own
        # free port (0) is chosen here too, so it cannot be one of these.
        chosen = iter(free_ports(3 * size, host))
        self.route_ports = [next(chosen) for _ in range(size)]
        self.monitor_ports = [next(chosen) for _ in range(size)]
        ports = [port or next(chosen) for port in ports]
        self._route_password = secrets.token_urlsafe(24)
        self.nodes: dict[str, NatsServer] = {}
        for index, port in enumerate(ports):
            node = node_name(index)
            log_file = Path(log_dir) / f"nats-server-{node}.log" if log_dir else None
            self.nodes[node] = NatsServer(
                self.directory / node / "jetstream",
                port=port,
                host=host,
                config_file=str(self.directory / f"{node}.conf"),
                log_file=log_file,
                binary=binary,
            )

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (what NATS_URL takes)."""
        return ",".join(node.url for node in self.nodes.values())

    def monitor_url(self, node: str) -> str:
        index = list(self.nodes).index(node)
        return f"http://{self.host}:{self.monitor_ports[index]}"

    # configs

    def _route_url(self, index: int) -> str:
        return f"nats-route://{ROUTE_USER}:{self._route_password}@{self.host}:{self.route_ports[index]}"

    def _config(self, index: int) -> str:
        routes = ", ".join(json.dumps(self._route_url(i)) for i in range(self.size) if i != index)
        lines = [
            "# Written by chorus for one node of a local cluster; rewritten on every start.",
            f"server_name: {node_name(index)}",
            f'http: "{self.host}:{self.monitor_ports[index]}"',
            "cluster {",
            f"  name: {self.name}",
            f'  listen: "{self.host}:{self.route_ports[index]}"',
            f"  authorization {{ user: {ROUTE_USER}, password: "
            f"{json.dumps(self._route_password)} }}",
            f"  routes: [{routes}]",
            "}",
        ]
        if self.auth_include is not None:
            # nats-server resolves includes relative to the including file only.
            relative = os.path.relpath(self.auth_include.resolve(), self.directory.resolve())
            lines.append(f"include {json.dumps(relative)}")
        return "\n".join(lines) + "\n"

    def write_configs(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for index, node in enumerate(self.nodes.values()):
            path = Path(node.config_file or "")
            path.write_text(self._config(index))
            os.chmod(path, 0o600)  # it holds the route password

    # lifecycle

    def start(self, timeout: float = FORM_TIMEOUT_S) -> NatsCluster:
        """Start every node, then wait until the cluster has formed (`wait_formed`)."""
        self.write_configs()
        failures: list[BaseException] = []

        def start_node(node: NatsServer) -> None:
            try:
                node.start(timeout)
            except BaseException as exc:  # reported below, with the others
                failures.append(exc)

        # Together: a node's JetStream waits for its peers' routes before it is ready.
        starters = [threading.Thread(target=start_node, args=(n,)) for n in self.nodes.values()]
        for starter in starters:
            starter.start()
        for starter in starters:
            starter.join()
        if failures:
            self.stop()
            raise failures[0]
        try:
            self.wait_formed(timeout)
        except ConfigError:
            self.stop()
            raise
        log.info("nats cluster formed", extra={"url": self.url, "leader": self.meta_leader()})
        return self

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def kill(self, node: str) -> None:
        """SIGKILL one node: a crash."""
        self.nodes[node].kill()

    def restart(self, node: str, timeout: float = FORM_TIMEOUT_S) -> None:
        """Start a stopped or killed node on its ports and store; returns once it has rejoined."""
        self.nodes[node].start(timeout)
        self.wait_formed(timeout)

    # what the cluster says about itself

    def running(self) -> dict[str, str]:
        """The monitoring URL of each node that runs now, by name."""
        return {
            name: self.monitor_url(name)
            for name, node in self.nodes.items()
            if node.pid is not None and not node.exited
        }

    def jsz(self, node: str) -> dict[str, object] | None:
        """The node's /jsz, or None when it does not answer."""
        return jsz(self.monitor_url(node))

    def meta_leader(self) -> str | None:
        """The JetStream meta leader's name as the running nodes see it (None: no leader)."""
        for url in self.running().values():
            leader = meta_leader_seen(url)
            if leader:
                return leader
        return None

    def formed(self) -> bool:
        """Every running node names the same meta leader, which sees every other current."""
        return formed(self.running(), self.size)

    def wait_formed(self, timeout: float = FORM_TIMEOUT_S) -> None:
        """Until `formed()`, looking every 50 ms; ConfigError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.formed():
            if time.monotonic() > deadline:
                seen = {node: meta_leader_seen(url) for node, url in self.running().items()}
                raise ConfigError(
                    f"the NATS cluster did not form within {timeout}s (the JetStream meta "
                    f"leader each node sees: {seen}); see the nodes' logs"
                )
            time.sleep(_POLL_S)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def jsz(monitor_url: str) -> dict[str, object] | None:
    """A node's /jsz (its JetStream view), or None when it does not answer."""
    try:
        with urllib.request.urlopen(monitor_url + "/jsz", timeout=_HTTP_TIMEOUT_S) as response:
            data = json.load(response)
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _meta(monitor_url: str) -> dict[str, object] | None:
    meta = (jsz(monitor_url) or {}).get("meta_cluster")
    return meta if isinstance(meta, dict) else None


def meta_leader_seen(monitor_url: str) -> str | None:
    """The meta leader a node names ("" while it knows none; None: it does not answer)."""
    meta = _meta(monitor_url)
    return None if meta is None else str(meta.get("leader") or "")


def formed(monitors: Mapping[str, str], size: int) -> bool:
    """Whether the nodes (name -> monitoring URL, those running) form a cluster of `size`:
    each names the same JetStream meta leader, and the leader sees every other one current."""
    metas = {node: _meta(url) for node, url in monitors.items()}
    leaders = {str(meta.get("leader") or "") for meta in metas.values() if meta is not None}
    if len(leaders) != 1 or None in metas.values():
        return False
    leader = leaders.pop()
    view = metas.get(leader)
    if view is None or view.get("cluster_size") != size:
        return False
    peers = view.get("replicas")
    current = (
        {p.get("name") for p in peers if isinstance(p, dict) and p.get("current")}
        if isinstance(peers, list)
        else set()
    )
    return current >= set(monitors) - {leader}
