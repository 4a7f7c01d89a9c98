"""The container deployment files, checked against the code and a real nats-server.

No Docker engine is needed: docker-compose.yml, the Dockerfile and .dockerignore are read
and checked against the real `chorus` parser, the agent loader and pyproject.toml; the
generated NATS config of deploy/auth runs on the real nats-server with the flags compose
gives it (`-js -sd <dir> -m <port>`, on a temp dir and free ports here, with credentials
`chorus auth init` makes for the test); and compose's services run as local processes with
the commands, environment and credentials compose gives them (`as_local_process`).
"""

from __future__ import annotations

import asyncio
import fnmatch
import inspect
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import httpx
import pytest
import yaml
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families

from chorus.agent.host import AgentHost
from chorus.agent.loader import load_agent
from chorus.auth import AuthLayout, init_auth
from chorus.auth.permissions import inbox
from chorus.cli.auth import example_specs
from chorus.cli.main import build_parser
from chorus.client import ChorusClient
from chorus.config import Settings
from chorus.errors import NatsAuthRefused
from chorus.gateway.keys import add_key
from chorus.messages import Heartbeat, RunRecord, Task, decode
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer, find_binary
from chorus.specs.agent import load_spec

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
AUTH_DIR = ROOT / "deploy" / "auth"  # what `chorus auth init --dir deploy/auth` writes
AUTH_DIR_IN_COMPOSE = "deploy/auth"

# `chorus` commands that compose runs but that are still being built. Remove each one from
# this set when its service lands: its checks then must pass (they show XPASS until then).
NOT_BUILT_YET: set[str] = set()

NATS_SERVICE = "nats"
SEED_VARIABLE = "NATS_NKEY_SEED"


# --- reading the files ---------------------------------------------------------------------


COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
# Services run from the Chorus image (the ones that build it); the rest is NATS.
CHORUS_SERVICES = sorted(name for name, service in SERVICES.items() if "build" in service)
COMMANDED = [name for name in CHORUS_SERVICES if SERVICES[name].get("command")]
LONG_RUNNING = [name for name in COMMANDED if "profiles" not in SERVICES[name]]
AGENTS = [name for name in COMMANDED if SERVICES[name]["command"][:2] == ["agent", "run"]]


def by_command(names: list[str]) -> list[Any]:
    """Parametrize over services; those whose command is not built yet are expected to fail."""
    not_built = pytest.mark.xfail(strict=False, reason="service not built yet")
    return [
        pytest.param(name, marks=not_built)
        if SERVICES[name]["command"][0] in NOT_BUILT_YET
        else name
        for name in names
    ]


def principal_of(name: str) -> str:
    """The NATS principal a compose service should connect as: its own service principal,
    `agent-<name>` for an agent, the operator for the `cli` service."""
    if name in AGENTS:
        return f"agent-{name}"
    return "operator" if name == "cli" else name


def secret_files(name: str, variables: Mapping[str, str] | None = None) -> dict[str, str]:
    """Container path -> host path (as compose names it, repo-relative) of a service's secrets."""
    found = {}
    for entry in SERVICES[name].get("secrets", []):
        if isinstance(entry, str):
            source, target = entry, entry
        else:
            source, target = entry["source"], entry.get("target", entry["source"])
        path = target if target.startswith("/") else f"/run/secrets/{target}"
        host = interpolate(COMPOSE["secrets"][source]["file"], variables or {})
        found[path] = host.removeprefix("./")
    return found


def volume_files(name: str) -> dict[str, str]:
    """Container path -> host path or volume name, of a service's volumes."""
    return {
        target: source.removeprefix("./")
        for source, target, *_ in (volume.split(":") for volume in SERVICES[name]["volumes"])
    }


class Instruction(NamedTuple):
    keyword: str
    args: str


def dockerfile_stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions, continuation lines joined, grouped by FROM."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[Instruction]] = []
    for text in logical:
        keyword, _, args = text.strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(keyword.upper(), args.strip()))
    return stages


class Copy(NamedTuple):
    """A COPY from the build context: its sources (repo-relative) and absolute destination."""

    sources: list[str]
    destination: PurePosixPath


def context_copies(stage: list[Instruction]) -> list[Copy]:
    copies = []
    workdir = PurePosixPath("/")
    for instruction in stage:
        if instruction.keyword == "WORKDIR":
            workdir = workdir / instruction.args
        if instruction.keyword != "COPY":
            continue
        words = shlex.split(instruction.args)
        if any(word.startswith("--from") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        copies.append(Copy(paths[:-1], workdir / paths[-1]))
    return copies


def image_path_in_repo(path: str) -> Path:
    """The repository file that the runtime image holds at `path`, through its COPY lines."""
    wanted = PurePosixPath(path)
    for copy in context_copies(dockerfile_stages()[-1]):
        for source in copy.sources:
            if wanted == copy.destination or copy.destination in wanted.parents:
                return ROOT / source / wanted.relative_to(copy.destination)
    raise AssertionError(f"no COPY in the runtime stage of the Dockerfile puts anything at {path}")


def dockerignored(path: str) -> bool:
    """Docker's rule, simplified: the last matching pattern wins; a match on a parent counts."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    candidates = [path, *(str(parent) for parent in PurePosixPath(path).parents)][:-1]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):
            ignored = not negated
    return ignored


def duration_seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}`, against `variables`."""

    def resolve(match: re.Match[str]) -> str:
        name, kind, rest = match.groups()
        if variables.get(name):
            return variables[name]
        if kind == "-":
            return str(rest)
        raise AssertionError(f"compose would refuse to start: {name} is not set ({rest})")

    return re.sub(r"\$\{(\w+)(?::([-?])([^}]*))?\}", resolve, value)


class LocalProcess(NamedTuple):
    argv: list[str]
    env: dict[str, str]


def repo_file(path: str) -> Path:
    return ROOT / path


def as_local_process(
    name: str,
    nats_url: str,
    variables: Mapping[str, str],
    host_path: Callable[[str], Path] = repo_file,
) -> LocalProcess:
    """What compose runs for service `name`, as a process on this machine: the image's
    `chorus` entrypoint becomes `python -m chorus`, paths in the image become the repository
    files the Dockerfile copies there, a variable naming a secret's path in the container
    (`/run/secrets/...`) names the file compose mounts there (through `host_path`), and
    nats://nats:4222 becomes `nats_url`."""
    service = SERVICES[name]
    args = [
        str(image_path_in_repo(arg)) if PurePosixPath(arg).is_absolute() else arg
        for arg in service["command"]
    ]
    environment = {
        key: interpolate(str(value), variables)
        for key, value in service["environment"].items()
        if value is not None  # compose passes these through only when set on the host
    }
    environment["NATS_URL"] = environment["NATS_URL"].replace("nats://nats:4222", nats_url)
    mounted = secret_files(name, variables)
    for key, value in environment.items():
        if value in mounted:
            environment[key] = str(host_path(mounted[value]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), **environment}
    return LocalProcess([sys.executable, "-m", "chorus", *args], env)


# --- compose: commands, credentials, topology -----------------------------------------------


@pytest.mark.parametrize("name", by_command(COMMANDED))
def test_compose_commands_parse_with_the_real_chorus_parser(name: str) -> None:
    command = SERVICES[name]["command"]
    try:
        args = build_parser().parse_args(command)
    except SystemExit:
        pytest.fail(f"service {name}: `chorus {shlex.join(command)}` is not a chorus command")
    assert callable(args.func)


@pytest.mark.parametrize("name", by_command(LONG_RUNNING))
def test_compose_services_run_in_service_mode_with_json_logs(name: str) -> None:
    args = build_parser().parse_args(SERVICES[name]["command"])
    assert getattr(args, "service", False), f"`chorus {args.command}` is not marked service=True"


@pytest.mark.parametrize("name", AGENTS)
def test_agent_spec_paths_are_specs_that_the_image_contains(name: str) -> None:
    spec_path = SERVICES[name]["command"][2]
    in_repo = image_path_in_repo(spec_path)

    agent = load_agent(str(in_repo))

    assert agent.name == name, f"service {name} runs the spec of agent {agent.name}"


def test_compose_runs_at_least_two_different_agents() -> None:
    specs = {SERVICES[name]["command"][2] for name in AGENTS}
    assert len(specs) >= 2


def generated_principals() -> dict[str, str]:
    """Principal -> role, from the comments `chorus auth init` writes above each user."""
    text = (AUTH_DIR / "nats-auth.conf").read_text()
    return dict(re.findall(r"^\s*# ([\w-]+) \((\w+)", text, flags=re.MULTILINE))


@pytest.mark.parametrize("name", CHORUS_SERVICES)
def test_chorus_services_reach_nats_as_their_own_principal_with_its_seed_only(name: str) -> None:
    environment = SERVICES[name]["environment"]
    principal = principal_of(name)
    secrets_ = secret_files(name)
    seed_file = f"{AUTH_DIR_IN_COMPOSE}/creds/{principal}.nk"

    assert environment["NATS_URL"] == "nats://nats:4222"
    assert principal in generated_principals()
    assert secrets_[environment[SEED_VARIABLE]] == seed_file
    # no other principal's seed, and no password credentials besides
    assert [p for p in secrets_.values() if "/creds/" in p] == [seed_file]
    assert environment["NATS_INBOX_PREFIX"] == inbox(principal)
    assert not {"NATS_USER", "NATS_PASSWORD", "NATS_TOKEN", "NATS_CREDS"} & set(environment)


def test_compose_mounts_every_seed_it_names_from_deploy_auth_creds() -> None:
    files = {name: secret["file"] for name, secret in COMPOSE["secrets"].items()}
    seeds = {name: path for name, path in files.items() if path.endswith(".nk")}

    assert seeds, "no nkey seeds are mounted"
    for name, path in seeds.items():
        principal = PurePosixPath(path).stem
        assert path == f"./{AUTH_DIR_IN_COMPOSE}/creds/{principal}.nk"
        assert name == f"nkey-{principal}"


@pytest.mark.parametrize("path", ["deploy/auth/creds/agent-writer.nk", "deploy/auth/creds/x.env"])
def test_seeds_stay_out_of_git_and_the_image(path: str) -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
    assert ignored.returncode == 0, f"git would commit {path}"
    assert dockerignored(path)


@pytest.mark.parametrize("name", AGENTS)
def test_agents_can_be_scaled_out(name: str) -> None:
    service = SERVICES[name]
    assert "container_name" not in service
    assert "ports" not in service


@pytest.mark.parametrize("name", AGENTS)
def test_agents_get_longer_to_stop_than_their_drain_timeout(name: str) -> None:
    drain = inspect.signature(AgentHost.stop).parameters["timeout"].default
    assert duration_seconds(SERVICES[name]["stop_grace_period"]) > drain


@pytest.mark.parametrize("name", CHORUS_SERVICES)
def test_chorus_services_start_once_nats_is_healthy(name: str) -> None:
    assert SERVICES[name]["depends_on"] == {NATS_SERVICE: {"condition": "service_healthy"}}


@pytest.mark.parametrize("name", [NATS_SERVICE, *LONG_RUNNING])
def test_long_running_services_restart_unless_stopped(name: str) -> None:
    assert SERVICES[name]["restart"] == "unless-stopped"


def test_nats_runs_an_official_alpine_image_of_2_11_or_later() -> None:
    match = re.fullmatch(r"nats:(\d+)\.(\d+)(?:\.\d+)?-alpine", SERVICES[NATS_SERVICE]["image"])
    assert match, "pin an -alpine tag (it has the shell and wget for the health check)"
    assert (int(match.group(1)), int(match.group(2))) >= (2, 11)


def test_nats_uses_the_generated_config_and_its_users_with_jetstream_on_a_named_volume() -> None:
    nats_service = SERVICES[NATS_SERVICE]
    command = nats_service["command"]
    mounts = volume_files(NATS_SERVICE)
    config = PurePosixPath(command[command.index("-c") + 1])
    (include,) = re.findall(
        r'^include "([^"]+)"', (AUTH_DIR / "nats-server.conf").read_text(), re.M
    )

    assert mounts[str(config)] == f"{AUTH_DIR_IN_COMPOSE}/nats-server.conf"
    # The include is read from the config's folder in the container.
    assert mounts[str(config.parent / include)] == f"{AUTH_DIR_IN_COMPOSE}/{include}"
    assert all(v.endswith(":ro") for v in nats_service["volumes"] if v.startswith("./"))
    assert not any("creds" in source for source in mounts.values()), "nats needs no seed"
    assert "environment" not in nats_service, "the generated config reads no variables"
    assert "-js" in command
    assert mounts[command[command.index("-sd") + 1]] in COMPOSE["volumes"]


def test_nats_health_check_asks_jetstream_health_on_the_monitoring_port() -> None:
    nats_service = SERVICES[NATS_SERVICE]
    command = nats_service["command"]
    check = nats_service["healthcheck"]["test"]

    assert command[command.index("-m") + 1] == "8222"
    assert check[:4] == ["CMD", "wget", "-q", "--spider"]
    # inside the container, where the generated config keeps the unauthenticated port
    assert re.fullmatch(r"http://127\.0\.0\.1:8222/healthz\?js-enabled-only=true", check[4])
    assert "http: 127.0.0.1:8222" in (AUTH_DIR / "nats-server.conf").read_text()
    assert not any(port.endswith(":8222") for port in nats_service["ports"])


def test_gateway_publishes_the_port_it_listens_on_all_interfaces() -> None:
    gateway = SERVICES["gateway"]
    port = gateway["environment"].get("CHORUS_GATEWAY_PORT", "8080")
    runtime_env = " ".join(i.args for i in dockerfile_stages()[-1] if i.keyword == "ENV")

    assert any(mapping.endswith(f":{port}") for mapping in gateway["ports"])
    assert re.search(r"\bCHORUS_GATEWAY_HOST=0\.0\.0\.0\b", runtime_env)


def test_gateway_reads_its_api_keys_from_a_compose_secret_kept_out_of_git_and_the_image() -> None:
    gateway = SERVICES["gateway"]
    (secret,) = [s for s in gateway["secrets"] if s == "gateway_keys"]
    source = interpolate(COMPOSE["secrets"][secret]["file"], {}).removeprefix("./")

    assert gateway["environment"]["CHORUS_GATEWAY_KEYS"] == f"/run/secrets/{secret}"
    assert "--no-auth" not in gateway["command"]
    assert dockerignored(source)
    assert source in (ROOT / ".gitignore").read_text().splitlines()


# --- Dockerfile and build context -------------------------------------------------------------


def test_image_is_built_on_python_311_slim() -> None:
    bases = [stage[0].args.split()[0] for stage in dockerfile_stages()]
    assert bases and all(base == "python:3.11-slim" for base in bases)


def test_image_entrypoint_is_the_chorus_command() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoints = [i.args for i in dockerfile_stages()[-1] if i.keyword == "ENTRYPOINT"]

    assert [json.loads(e) for e in entrypoints][-1:] == [["chorus"]]
    assert "chorus" in scripts


def test_image_runs_as_a_non_root_user() -> None:
    users = [i.args for i in dockerfile_stages()[-1] if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}


@pytest.mark.parametrize(
    "source",
    sorted({s for stage in dockerfile_stages() for c in context_copies(stage) for s in c.sources}),
)
def test_dockerfile_copies_files_that_exist_in_the_build_context(source: str) -> None:
    assert (ROOT / source).exists()
    assert not dockerignored(source.rstrip("/")), f"{source} is excluded by .dockerignore"


@pytest.mark.parametrize(
    "path",
    [
        ".git",
        ".venv",
        ".env",
        ".chorus",
        "gateway-keys.jsonl",
        "tests",
        "shared/chorus/__pycache__",
    ],
)
def test_build_context_leaves_out_local_state_and_secrets(path: str) -> None:
    assert dockerignored(path)


# --- nats-server.conf on the real server --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def compose_nats_server(store_dir: Path, host_path: Callable[[str], Path]) -> NatsServer:
    """The compose `nats` service as a local nats-server, with every flag of its command: the
    config file through its bind mount (`host_path` of its host path), the store on
    `store_dir` instead of the named volume, the monitoring port on a free port. Any other
    flag compose adds is passed on as it is; a flag compose drops (`-js`, ...) fails here."""
    command = list(SERVICES[NATS_SERVICE]["command"])
    mounts = volume_files(NATS_SERVICE)

    def take(flag: str, *, with_value: bool = True) -> str:
        at = command.index(flag)
        value = command[at + 1] if with_value else ""
        del command[at : at + (2 if with_value else 1)]
        return value

    config = take("-c")
    take("-js", with_value=False)  # NatsServer always passes -js
    take("-sd")
    take("-m")
    return NatsServer(
        store_dir,
        config_file=str(host_path(mounts[config])),
        monitor_port=free_port(),
        extra_args=command,
    )


def host_paths(auth_dir: Path) -> Callable[[str], Path]:
    """Host paths as compose names them, with `auth_dir` standing in for deploy/auth."""

    def host_path(path: str) -> Path:
        if PurePosixPath(path).is_relative_to(AUTH_DIR_IN_COMPOSE):
            return auth_dir / PurePosixPath(path).relative_to(AUTH_DIR_IN_COMPOSE)
        return ROOT / path

    return host_path


class ComposeNats(NamedTuple):
    """The compose `nats` service on this machine, with credentials made for the test."""

    server: NatsServer
    layout: AuthLayout
    variables: dict[str, str]  # what compose would read from .env or the shell
    host_path: Callable[[str], Path]

    @property
    def monitor_port(self) -> int:
        assert self.server.monitor_port is not None
        return self.server.monitor_port

    def local(self, name: str) -> LocalProcess:
        return as_local_process(name, self.server.url, self.variables, self.host_path)

    def settings(self, principal: str) -> Settings:
        return self.layout.settings_for(principal, Settings(nats_url=self.server.url))

    def principal_of_key(self, public_key: str) -> str:
        return {key: name for name, key in self.layout.keys.items()}.get(public_key, public_key)


def generate_deploy_auth(directory: Path) -> AuthLayout:
    """`chorus auth init --dir deploy/auth` for the example agents, into `directory`."""
    return init_auth(directory, [load_spec(spec) for spec in example_specs()])


@pytest.fixture
def compose_nats(tmp_path: Path) -> Iterator[ComposeNats]:
    """deploy/auth's server config on nats-server, as compose runs it, with fresh seeds (the
    repository has none: `chorus auth init` makes them in each deployment)."""
    layout = generate_deploy_auth(tmp_path / "deploy-auth")
    # The server config is the committed one (nats-auth.conf differs only in the public keys).
    assert layout.server_config.read_text() == (AUTH_DIR / "nats-server.conf").read_text()
    host_path = host_paths(Path(layout.directory))
    server = compose_nats_server(tmp_path / "data", host_path).start()
    variables = {"CHORUS_GATEWAY_KEYS_FILE": str(tmp_path / "gateway-keys.jsonl")}
    yield ComposeNats(server, layout, variables, host_path)
    server.stop()


async def test_services_with_different_principals_talk_in_one_account(
    compose_nats: ComposeNats,
) -> None:
    """A heartbeat published as agent-researcher arrives at the coordinator's subscription."""
    coordinator = await connect(compose_nats.settings("coordinator"), "test-coordinator")
    agent = await connect(compose_nats.settings("agent-researcher"), "test-agent")
    subject = Settings().subjects.heartbeat("researcher-deploycheck")
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def on_message(msg: Msg) -> None:
        if not received.done():
            received.set_result(msg.data)

    try:
        await coordinator.subscribe(subject, cb=on_message)
        await coordinator.flush(timeout=30)  # the subscription is on the server
        await agent.publish(subject, b"hello")
        assert await asyncio.wait_for(received, 30) == b"hello"
    finally:
        await coordinator.close()
        await agent.close()


async def test_the_services_account_has_jetstream(compose_nats: ComposeNats) -> None:
    orchestrator = await connect(compose_nats.settings("orchestrator"), "test-orchestrator")
    try:
        info = await orchestrator.jetstream(timeout=5).account_info()
    finally:
        await orchestrator.close()
    assert info.limits.max_streams != 0


async def test_nats_refuses_a_client_without_credentials_or_with_an_unknown_nkey(
    compose_nats: ComposeNats, tmp_path: Path
) -> None:
    stranger = init_auth(tmp_path / "stranger", [], services=["operator"])
    for settings in (
        Settings(nats_url=compose_nats.server.url),
        stranger.settings_for("operator", Settings(nats_url=compose_nats.server.url)),
    ):
        with pytest.raises(NatsAuthRefused):
            await connect(settings, "test-stranger")


def test_compose_health_check_url_answers_ok(compose_nats: ComposeNats) -> None:
    url = SERVICES[NATS_SERVICE]["healthcheck"]["test"][4]
    local = re.sub(r"//[\w.]+:8222/", f"//127.0.0.1:{compose_nats.monitor_port}/", url)
    with urllib.request.urlopen(local, timeout=5) as response:
        assert response.status == 200


def test_the_committed_nats_config_is_valid_for_nats_server() -> None:
    checked = subprocess.run(
        [find_binary(), "-c", str(AUTH_DIR / "nats-server.conf"), "-t"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert checked.returncode == 0, checked.stderr + checked.stdout


async def test_compose_agent_services_serve_tasks_as_local_processes(
    compose_nats: ComposeNats, tmp_path: Path
) -> None:
    cli = await connect(compose_nats.settings("operator"), "test-cli")
    prefix = interpolate(SERVICES[AGENTS[0]]["environment"]["CHORUS_PREFIX"], {})
    subjects = Settings(prefix=prefix).subjects
    ready: set[str] = set()
    all_ready = asyncio.Event()

    async def on_heartbeat(msg: Msg) -> None:
        beat = decode(msg.data, Heartbeat)
        if beat.state == "ready":
            ready.add(beat.name)
            if ready >= set(AGENTS):
                all_ready.set()

    await cli.subscribe(subjects.all_heartbeats, cb=on_heartbeat)
    processes: dict[str, subprocess.Popen[bytes]] = {}
    # Under the generated permissions agents only use the streams and buckets the
    # coordinator creates (compose starts them together): the coordinator runs too.
    try:
        for name in ["coordinator", *AGENTS]:
            local = compose_nats.local(name)
            with (tmp_path / f"{name}.log").open("wb") as log:
                processes[name] = subprocess.Popen(
                    local.argv, env=local.env, stdout=log, stderr=subprocess.STDOUT
                )
        await asyncio.wait_for(all_ready.wait(), 60)
        client = ChorusClient(cli, subjects, timeout=30)

        results = [await client.run_task(Task(input="status?"), agent=name) for name in AGENTS]

        assert [result.agent for result in results] == AGENTS
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        codes = [await asyncio.to_thread(p.wait, 45) for p in processes.values()]
        assert codes == [0] * len(processes)
    finally:
        await cli.close()
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


# --- the whole compose system as local processes ------------------------------------------------

# What `docker compose up` starts: every service that is not behind a profile.
UP = [name for name in SERVICES if "profiles" not in SERVICES[name]]


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


class LocalSystem:
    """Compose's services (all but nats) running as local processes, each logging to a file."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, local: LocalProcess) -> None:
        with (self.log_dir / f"{name}.log").open("wb") as log:
            self.processes[name] = subprocess.Popen(
                local.argv, env=local.env, stdout=log, stderr=subprocess.STDOUT
            )

    def check_running(self) -> None:
        """Fail at once, with its log, when a service has exited: waiting on would only time out."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                log = tail(self.log_dir / f"{name}.log")
                raise AssertionError(f"service {name} exited with {process.returncode}:\n{log}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}\n{tail(self.log_dir / f'{name}.log')}" for name in self.processes
        )

    def kill_leftovers(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


async def wait_until_healthy(
    http: httpx.AsyncClient,
    system: LocalSystem,
    looked_again: asyncio.Event,
    agents: set[str],
    timeout: float,
) -> dict[str, Any]:
    """`GET /api/health` until it is ok with every agent healthy. It is asked again only when
    something that can change the answer arrived (a heartbeat or an agent status change):
    before that the gateway may not be listening yet, or the coordinator not have seen them."""
    last: Any = "the gateway never answered"
    try:
        async with asyncio.timeout(timeout):
            while True:
                looked_again.clear()
                system.check_running()
                try:
                    response = await http.get("/api/health")
                except httpx.TransportError as exc:  # not listening yet
                    last = repr(exc)
                else:
                    last = health = response.json()
                    healthy = {a["name"] for a in health["agents"] if a["health"] == "healthy"}
                    if health["status"] == "ok" and healthy >= agents:
                        return dict(health)
                await looked_again.wait()
    except TimeoutError:
        raise AssertionError(
            f"no healthy system within {timeout}s; last health: {last}\n{system.logs()}"
        ) from None


@pytest.mark.slow
async def test_the_compose_system_runs_workflows_through_the_gateway_as_local_processes(
    compose_nats: ComposeNats, tmp_path: Path
) -> None:
    started = [name for name in UP if name != NATS_SERVICE]
    locals_ = {name: compose_nats.local(name) for name in started}
    gateways = [name for name in started if SERVICES[name]["command"][0] == "gateway"]
    assert len(gateways) == 1, f"compose should run one gateway, not {gateways}"
    gateway_env = locals_[gateways[0]].env
    # Compose publishes the gateway's CHORUS_GATEWAY_PORT (8080) on the host; here only that
    # port changes, to a free one, so the test runs beside anything on 8080. The host stays
    # the local default 127.0.0.1 (the image's CHORUS_GATEWAY_HOST=0.0.0.0 is for containers).
    assert "CHORUS_GATEWAY_PORT" in SERVICES[gateways[0]]["environment"]
    gateway_env["CHORUS_GATEWAY_PORT"] = str(free_port())
    # The keys file compose mounts as a secret (CHORUS_GATEWAY_KEYS_FILE), made as
    # deploy/README.md says; every seed likewise comes from the test's deploy/auth.
    keys_file = compose_nats.variables["CHORUS_GATEWAY_KEYS_FILE"]
    assert gateway_env["CHORUS_GATEWAY_KEYS"] == keys_file
    api_key = add_key(Path(keys_file), "test", ["read", "execute"])
    for name, local in locals_.items():
        seed = compose_nats.layout.seed_file(principal_of(name))
        assert Path(local.env[SEED_VARIABLE]) == seed, name
    prefix = gateway_env["CHORUS_PREFIX"]
    assert {local.env["CHORUS_PREFIX"] for local in locals_.values()} == {prefix}
    subjects = Settings(prefix=prefix).subjects
    capabilities = {
        name: load_agent(str(image_path_in_repo(SERVICES[name]["command"][2]))).spec.capabilities
        for name in AGENTS
    }

    cli = await connect(compose_nats.settings("operator"), "test-cli")
    looked_again = asyncio.Event()

    async def on_change(msg: Msg) -> None:
        looked_again.set()

    await cli.subscribe(subjects.all_heartbeats, cb=on_change)
    await cli.subscribe(subjects.all_status, cb=on_change)
    await cli.flush(timeout=5)
    system = LocalSystem(tmp_path)
    base_url = f"http://127.0.0.1:{gateway_env['CHORUS_GATEWAY_PORT']}"
    try:
        for name in started:
            system.start(name, locals_[name])
        async with httpx.AsyncClient(
            base_url=base_url,
            timeout=60,
            trust_env=False,
            headers={"Authorization": f"Bearer {api_key}"},
        ) as http:
            health = await wait_until_healthy(http, system, looked_again, set(AGENTS), 60)

            by_name = await http.post(
                "/api/execute",
                json={"workflow_name": "research-report", "input": "What is JetStream?"},
                params={"wait": "true", "timeout": "45"},
            )
            # One task per compose agent, each routed by a capability of its spec.
            inline = {
                "type": "parallel",
                "name": "every-agent",
                "tasks": [
                    {"name": name, "capability": capabilities[name][0], "instructions": "Go."}
                    for name in AGENTS
                ],
            }
            by_workflow = await http.post(
                "/api/execute",
                json={"workflow": inline, "input": "NATS"},
                params={"wait": "true", "timeout": "45"},
            )
            prometheus = await http.get("/metrics")
            connz = await http.get(
                f"http://127.0.0.1:{compose_nats.monitor_port}/connz", params={"auth": "true"}
            )
        # An nkey user is named by its public key.
        users = {
            compose_nats.principal_of_key(c.get("authorized_user", ""))
            for c in connz.json()["connections"]
        }

        for process in system.processes.values():
            process.send_signal(signal.SIGTERM)
        # Compose stops them all at once (none depends on another) and waits this long each.
        grace = {name: duration_seconds(SERVICES[name]["stop_grace_period"]) for name in started}
        codes = dict(
            zip(
                started,
                await asyncio.gather(
                    *(asyncio.to_thread(system.processes[n].wait, grace[n]) for n in started)
                ),
                strict=True,
            )
        )
    finally:
        await cli.close()
        system.kill_leftovers()

    assert health["coordinator"] == "ok"
    assert by_name.status_code == 200, by_name.text
    report = decode(by_name.content, RunRecord)
    assert report.status == "completed", f"{report.error}\n{system.logs()}"
    assert [step.status for step in report.steps] == ["completed"] * 3
    assert {step.agent for step in report.steps} <= set(AGENTS)
    assert report.output
    assert by_workflow.status_code == 200, by_workflow.text
    parallel = decode(by_workflow.content, RunRecord)
    assert parallel.status == "completed", f"{parallel.error}\n{system.logs()}"
    assert sorted(step.agent for step in parallel.steps) == sorted(AGENTS)
    samples = parse_prometheus(prometheus.text)
    assert samples["chorus_coordinator_up"] == [({}, 1.0)]
    healthy_agents = [(labels["agent"], value) for labels, value in samples["chorus_agent_healthy"]]
    assert sorted(healthy_agents) == sorted((name, 1.0) for name in AGENTS)
    # every service connected as the principal compose gives it (and this test as operator)
    assert users == {principal_of(name) for name in started} | {"operator"}
    assert codes == dict.fromkeys(started, 0), system.logs()


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name, through the Prometheus client's own parser."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples
