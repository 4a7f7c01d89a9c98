"""`chorus up`: the whole system on this machine, each part its own process.

An embedded nats-server (data kept in `--data-dir`), the coordinator, the orchestrator, the
gateway and the example agents (or yours), supervised: a child that exits is restarted with
backoff. Ctrl-C (or SIGTERM) drains the agents, stops the services, then the server.
The gateway requires an API key: an admin key is made on the first run and kept in the data
dir (`gateway.key`, mode 0600; its hash in `gateway-keys.jsonl`).

NATS authorization is on unless `--no-auth`: nkey credentials and least-privilege
permissions are generated into DATA_DIR/auth (seeds kept across runs), and each child connects
as its own principal. Commands in another terminal need the operator's credentials:
`set -a; . DATA_DIR/auth/creds/operator.env; set +a`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from chorus.errors import ConfigError
from chorus.examples import AGENTS
from chorus.gateway.keys import KEY_FILE, local_key
from chorus.local import LocalSystem, agent_principal
from chorus.specs.agent import AgentSpec, load_spec

if TYPE_CHECKING:
    from rich.table import Table

DEFAULT_AGENTS: tuple[tuple[str, int], ...] = (
    ("researcher", 2),
    ("analyst", 1),
    ("writer", 1),
    ("planner", 1),
    ("glossary", 1),
    ("editor", 1),
    ("announcer", 1),
)


@dataclass(frozen=True)
class AgentLaunch:
    name: str
    spec: Path
    replicas: int

    def load(self) -> AgentSpec:
        return load_spec(self.spec)


def parse_agent(argument: str) -> AgentLaunch:
    """`SPEC` or `SPEC=N` (N replicas); SPEC is a file or the name of an example agent."""
    spec_text, _, count = argument.partition("=")
    spec = Path(spec_text)
    if not spec.is_file():
        example = AGENTS / f"{spec_text}.yaml"
        if not example.is_file():
            raise ConfigError(
                f"--agent {argument}: no file {spec_text} and no example of that name"
            )
        spec = example
    try:
        replicas = int(count) if count else 1
    except ValueError:
        raise ConfigError(f"--agent {argument}: N in SPEC=N must be a whole number") from None
    if replicas < 1:
        raise ConfigError(f"--agent {argument}: N must be at least 1")
    return AgentLaunch(spec.stem, spec, replicas)


def default_agents() -> list[AgentLaunch]:
    return [AgentLaunch(n, AGENTS / f"{n}.yaml", r) for n, r in DEFAULT_AGENTS]


def start_services(
    system: LocalSystem,
    agents: list[AgentLaunch],
    *,
    gateway_port: int | None,
) -> None:
    """Start the coordinator, orchestrator, gateway (unless None) and agents as children,
    each as its own principal."""
    system.spawn("coordinator", "coordinator", principal="coordinator")
    system.spawn("orchestrator", "orchestrator", principal="orchestrator")
    if gateway_port is not None:
        keys_file, _ = local_key(system.data_dir)
        system.spawn(
            "gateway",
            "gateway",
            "--port",
            str(gateway_port),
            "--keys",
            str(keys_file),
            principal="gateway",
        )
    for agent in agents:
        principal = agent_principal(agent.load())
        for replica in range(1, agent.replicas + 1):
            system.spawn(
                f"{agent.name}-{replica}", "agent", "run", str(agent.spec), principal=principal
            )


def operator_hint(system: LocalSystem) -> str:
    """What a user types in another terminal to reach this system."""
    url = f"export NATS_URL={system.url}"
    if system.auth is None:
        return f"NATS authorization is off (--no-auth); other terminals: {url}"
    creds = system.auth.env_file("operator")
    return f"other terminals, as the operator: set -a; . {creds}; set +a; {url}"


def status_table(system: LocalSystem, gateway_port: int | None) -> Table:
    from rich.table import Table

    table = Table(
        title=f"chorus up — NATS_URL={system.url}"
        + (
            f"  gateway http://127.0.0.1:{gateway_port} (key in {system.data_dir / KEY_FILE})"
            if gateway_port is not None
            else ""
        )
        + "  (Ctrl-C stops everything)",
        title_justify="left",
    )
    for column in ("process", "pid", "state", "restarts", "log"):
        table.add_column(column)
    for name, server in system.servers.items():
        table.add_row(
            name if system.cluster is None else f"nats-server {name}",
            str(server.pid or ""),
            "[red]exited[/]" if server.exited else "[green]running[/]",
            str(system.restarts.get(name, 0)),
            str(server.log_file or ""),
        )
    for name, child in system.children.items():
        code = child.poll()
        state = "[green]running[/]" if code is None else f"[red]exited {code}[/]"
        table.add_row(
            name,
            str(child.pid),
            state,
            str(system.restarts.get(name, 0)),
            str(system.data_dir / "logs" / f"{name}.log"),
        )
    return table


async def run_up(
    data_dir: Path,
    port: int,
    gateway_port: int | None,
    agents: list[AgentLaunch],
    prefix: str,
    *,
    auth: bool = True,
    cluster: int = 1,
) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.markup import escape

    specs = [agent.load() for agent in agents] if auth else None
    system = LocalSystem(data_dir, port=port, prefix=prefix, agents=specs, cluster=cluster)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    console = Console()
    await asyncio.to_thread(system.start_server)
    try:
        start_services(system, agents, gateway_port=gateway_port)
        console.print(escape(operator_hint(system)))
        if gateway_port is not None:
            console.print(
                f"gateway API key (admin): {data_dir / KEY_FILE}; send it as "
                "`Authorization: Bearer <key>`"
            )
            console.print(
                f"web console: http://127.0.0.1:{gateway_port}/ (it asks for that key once)"
            )
        with Live(
            status_table(system, gateway_port), console=console, refresh_per_second=2
        ) as live:
            while not stop.is_set():
                system.supervise()
                if system.cluster is not None:
                    await asyncio.to_thread(system.supervise_servers)
                live.update(status_table(system, gateway_port))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)  # the status refresh period
    finally:
        with console.status("stopping: agents drain, then services, then NATS"):
            await asyncio.to_thread(system.stop)
    console.print(f"stopped; data kept in {data_dir}")
    return 0
