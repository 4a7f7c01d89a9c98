"""deploy/compose.cluster.yml, the three-node NATS cluster over docker-compose.yml: read as
compose would merge it, and its nodes run as local nats-servers with their commands and
deploy/nats-cluster.conf (no Docker engine runs in CI)."""

from __future__ import annotations

import json
import re
import secrets
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from chorus.auth import AuthLayout, init_auth
from chorus.config import Settings
from chorus.nats.cluster import formed, free_ports
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer
from chorus.nats.streams import ensure_dispatch_stream
from chorus.specs.agent import load_spec

ROOT = Path(__file__).resolve().parent.parent
BASE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
OVERRIDE: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "compose.cluster.yml").read_text())
NODES = {"nats": "n1", "nats-2": "n2", "nats-3": "n3"}
CHORUS_SERVICES = sorted(name for name, s in BASE["services"].items() if "build" in s)
ROUTE_PASSWORD = "CHORUS_ROUTE_PASSWORD"
_VARIABLE = re.compile(r"\$\{(\w+)(:\?[^}]*)?\}")


def service(name: str) -> dict[str, Any]:
    """A service as compose merges the two files: maps merged, lists (volumes) appended,
    scalars and `command` replaced."""
    merged = dict(BASE["services"].get(name, {}))
    for key, value in OVERRIDE["services"].get(name, {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        elif key == "volumes" and key in merged:
            merged[key] = [*merged[key], *value]
        else:
            merged[key] = value
    return merged


def interpolate(value: str, env: dict[str, str]) -> str:
    return _VARIABLE.sub(lambda m: env[m.group(1)], value)


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.mark.parametrize("name", CHORUS_SERVICES)
def test_every_chorus_service_gets_the_three_nodes_and_three_replicas(name: str) -> None:
    env = service(name)["environment"]

    assert env["NATS_URL"].split(",") == [f"nats://{node}:4222" for node in NODES]
    assert env["CHORUS_REPLICAS"] == "3"
    assert set(service(name)["depends_on"]) >= set(NODES)


def test_each_node_has_its_name_its_volume_and_routes_to_all_three() -> None:
    names = [flag(service(node)["command"], "-n") for node in NODES]
    data = [next(v for v in service(node)["volumes"] if v.endswith(":/data")) for node in NODES]

    assert names == list(NODES.values())
    assert len(set(data)) == 3
    for node in NODES:
        command = service(node)["command"]
        routes = flag(command, "--routes").split(",")
        assert [r.rsplit("@", 1)[1] for r in routes] == [f"{n}:6222" for n in NODES]
        assert all(r.startswith("nats-route://route:${CHORUS_ROUTE_PASSWORD") for r in routes)
        assert "--cluster" not in command  # it would drop the routes' authorization
        assert service(node)["image"] == BASE["services"]["nats"]["image"]
        assert ROUTE_PASSWORD in service(node)["environment"]


def test_only_the_first_node_publishes_ports_on_the_host() -> None:
    assert "ports" not in OVERRIDE["services"]["nats-2"]
    assert "ports" not in OVERRIDE["services"]["nats-3"]


class LocalNode:
    """One compose node as a local nats-server: its command's flags, its mounted config
    files (copied, with the route port made local: all three listen on 6222 in compose).
    deploy/auth's users come from `auth` (the same config with fresh keys: the repository
    has no seeds, each deployment makes its own)."""

    def __init__(
        self, name: str, directory: Path, route_ports: dict[str, int], auth: AuthLayout
    ) -> None:
        spec = service(name)
        command = list(spec["command"])
        mounts = dict(v.split(":")[1::-1] for v in spec["volumes"] if v.startswith("./"))
        directory.mkdir(parents=True)
        generated = {"deploy/auth/nats-auth.conf": auth.auth_include}
        for target, source in mounts.items():
            path = generated.get(source.removeprefix("./"), ROOT / source)
            text = Path(path).read_text()
            if target.endswith("nats-cluster.conf"):
                assert "listen: 0.0.0.0:6222" in text
                text = text.replace("0.0.0.0:6222", f"127.0.0.1:{route_ports[name]}")
            (directory / Path(target).name).write_text(text)
        self.config = directory / Path(flag(command, "-c")).name
        self.route_ports = route_ports
        self.command = command
        self.name = flag(command, "-n")
        self.directory = directory

    def server(self, env: dict[str, str]) -> NatsServer:
        routes = interpolate(flag(self.command, "--routes"), env)
        for host, port in self.route_ports.items():
            routes = routes.replace(f"@{host}:6222", f"@127.0.0.1:{port}")
        return NatsServer(
            self.directory / "data",
            config_file=str(self.config),
            monitor_port=free_ports(1)[0],
            extra_args=["-n", self.name, "--routes", routes],
            log_file=self.directory / "nats-server.log",
        )


def monitor(server: NatsServer) -> str:
    return f"http://127.0.0.1:{server.monitor_port}"


@pytest.fixture
def auth(tmp_path: Path) -> AuthLayout:
    """`chorus auth init` for the example agents, as a deployment runs it."""
    specs = sorted((ROOT / "shared/chorus/examples/agents").glob("*.yaml"))
    return init_auth(tmp_path / "deploy-auth", [load_spec(spec) for spec in specs])


@pytest.fixture
def passwords(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The variable compose reads from .env, in this process's environment (the servers'
    environment: nats-server expands `$VAR` in its config from it)."""
    env = {ROUTE_PASSWORD: f"r{secrets.token_hex(12)}"}
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    return env


@pytest.fixture
def route_ports() -> dict[str, int]:
    """Each node's route port (6222 for all in compose), by service."""
    return dict(zip(NODES, free_ports(len(NODES)), strict=True))


@pytest.fixture
def nodes(
    tmp_path: Path, passwords: dict[str, str], route_ports: dict[str, int], auth: AuthLayout
) -> Iterator[dict[str, NatsServer]]:
    servers = {
        NODES[name]: LocalNode(name, tmp_path / name, route_ports, auth).server(passwords)
        for name in NODES
    }
    try:
        for server in servers.values():
            server.start()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def wait_formed(servers: dict[str, NatsServer], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not formed({name: monitor(s) for name, s in servers.items()}, len(servers)):
        assert time.monotonic() < deadline, "the cluster did not form"
        time.sleep(0.05)  # a poll of /jsz under the deadline


async def test_the_nodes_form_a_cluster_that_keeps_three_copies_for_a_service_user(
    nodes: dict[str, NatsServer], auth: AuthLayout
) -> None:
    wait_formed(nodes)
    settings = auth.settings_for("coordinator", Settings(nats_url=nodes["n2"].url, replicas=3))
    nc = await connect(settings, "test")
    try:
        await ensure_dispatch_stream(nc.jetstream(), settings.subjects, replicas=3)
        info = await nc.jetstream().stream_info(settings.subjects.dispatch_stream)
    finally:
        await nc.close()

    assert info.config.num_replicas == 3
    assert info.cluster is not None and info.cluster.name == "chorus"


def test_a_server_without_the_route_password_does_not_join(
    nodes: dict[str, NatsServer],
    passwords: dict[str, str],
    route_ports: dict[str, int],
    tmp_path: Path,
    auth: AuthLayout,
) -> None:
    wait_formed(nodes)
    n1_routes = route_ports["nats"]
    # The nats-3 node's files and command, but another password and name, routed to n1.
    intruder = LocalNode("nats-3", tmp_path / "intruder", {"nats-3": free_ports(1)[0]}, auth)
    server = intruder.server({**passwords, ROUTE_PASSWORD: "wrong"})
    server.extra_args = ["-n", "n4", "--routes", f"nats-route://route:wrong@127.0.0.1:{n1_routes}"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ROUTE_PASSWORD, "wrong")
        server.start()
    try:
        deadline = time.monotonic() + 20
        assert server.log_file is not None
        while "Authorization Violation" not in server.log_file.read_text():
            assert time.monotonic() < deadline, "the intruder's routes were never refused"
            time.sleep(0.05)  # a poll of its log under the deadline
        routez = json.load(urllib.request.urlopen(monitor(nodes["n1"]) + "/routez", timeout=5))
    finally:
        server.stop()

    assert "n4" not in {route.get("remote_name") for route in routez["routes"]}
