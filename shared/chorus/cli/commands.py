"""The commands: small async functions from parsed arguments and settings to an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from chorus.config import Settings


def register(sub: Any) -> None:
    from chorus.cli import (
        agents,
        approvals,
        auth,
        completion,
        dlq,
        messaging,
        runs,
        sessions,
        state,
        usage,
    )

    messaging.register(sub)
    agents.register(sub)
    runs.register(sub)
    state.register(sub)
    auth.register(sub)
    sessions.register(sub)
    usage.register(sub)
    approvals.register(sub)
    completion.register(sub)
    dlq.register(sub)
    agent = sub.add_parser("agent", help="run an agent instance")
    agent_sub = agent.add_subparsers(dest="agent_command", required=True, metavar="ACTION")
    run = agent_sub.add_parser(
        "run",
        help="run one instance of an agent until SIGTERM/SIGINT (which drain it)",
        description="Run one agent instance. SPEC is a YAML spec file or package.module:agent.",
        epilog="example: chorus agent run examples/agents/researcher.yaml",
    )
    run.add_argument("spec", metavar="SPEC")
    run.add_argument("--instance", help="instance id (default: <name>-<random>)")
    run.set_defaults(func=agent_run, service=True)

    coordinator = sub.add_parser(
        "coordinator",
        help="run the coordinator: registry, health, routing, durable dispatch, metrics",
        description="Run the coordinator until SIGTERM/SIGINT. Any number may run; they share "
        "the work queue. Settings: CHORUS_UNHEALTHY_AFTER, CHORUS_DEAD_AFTER, "
        "CHORUS_MAX_ATTEMPTS, CHORUS_ROUTING_WEIGHTS, ... (README).",
    )
    coordinator.set_defaults(func=coordinator_run, service=True)

    gateway = sub.add_parser(
        "gateway",
        help="run the HTTP gateway: execute workflows, runs, health, metrics",
        description="Serve the HTTP API until SIGTERM/SIGINT: POST /api/execute, "
        "GET /api/runs/{id}, /api/health, /api/metrics, Prometheus /metrics, /openapi.json.",
        epilog="example: chorus gateway key add me --scope admin --keys keys.jsonl\n"
        "         chorus gateway --keys keys.jsonl --port 8080",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gateway.add_argument(
        "--host",
        default=None,
        help="address to listen on [env CHORUS_GATEWAY_HOST, default 127.0.0.1]",
    )
    gateway.add_argument(
        "--port",
        type=int,
        default=None,
        help="port to listen on, 0 for any free one [env CHORUS_GATEWAY_PORT, default 8080]",
    )
    gateway.add_argument(
        "--keys",
        metavar="FILE",
        help="API keys file (hashes), made with `chorus gateway key add` [env CHORUS_GATEWAY_KEYS]",
    )
    gateway.add_argument(
        "--no-auth",
        action="store_true",
        help="accept requests without a key: only when --host is a loopback address",
    )
    gateway.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a Host header to serve besides localhost, 127.0.0.1 and --host; `*` for any; "
        "repeatable [env CHORUS_GATEWAY_ALLOWED_HOSTS, comma-separated]",
    )
    gateway.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin (https://name[:port]) whose pages may call the API; repeatable "
        "[env CHORUS_GATEWAY_ALLOWED_ORIGINS, comma-separated]",
    )
    gateway.add_argument(
        "--max-waiting",
        type=int,
        help="execute requests waiting for their run at once, then 429 "
        "[env CHORUS_GATEWAY_MAX_WAITING, default 64]",
    )
    gateway.set_defaults(func=gateway_run, service=True)
    register_keys(gateway)

    orchestrator = sub.add_parser(
        "orchestrator",
        help="run the orchestrator: durable workflow runs, resumed after crashes",
        description="Run the orchestrator until SIGTERM/SIGINT. Any number may run; they share "
        "the runs queue. Steps go through the coordinator's durable task queue unless "
        "--direct is given (then they are plain request-reply and need no coordinator). "
        "Pipeline steps' `processor:` names resolve only against the --processors modules.",
    )
    orchestrator.add_argument(
        "--direct", action="store_true", help="send steps by request-reply, not durably"
    )
    orchestrator.add_argument(
        "--processors",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module whose PROCESSORS mapping names output processors; repeatable",
    )
    orchestrator.set_defaults(func=orchestrator_run, service=True)

    schema = sub.add_parser(
        "schema",
        help="print the JSON Schema of every wire message",
        description="Print the JSON Schema (2020-12) of every Chorus wire message.",
    )
    schema.set_defaults(func=print_schema)

    demo = sub.add_parser(
        "demo",
        help="start a local system and run a task and one workflow of each pattern",
        description="Start an embedded nats-server, the coordinator, the orchestrator and the "
        "example agents as separate processes, route a task, park a tool call on a person's "
        "approval, run one example workflow of each pattern, print the results, stop. Needs no "
        "API key (offline model) and no Docker.",
        epilog="examples:\n  chorus demo             # decide its approval with `chorus approve ID`"
        "\n  chorus demo --approve   # unattended: the demo approves it itself"
        "\n  chorus demo --attach    # use the system at NATS_URL",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--data-dir", help="keep JetStream data and logs here (default: temp dir)")
    demo.add_argument("--task", default="What makes NATS a good fit for agent systems?")
    demo.add_argument(
        "--attach",
        action="store_true",
        help="use the running system at NATS_URL (e.g. from chorus up)",
    )
    demo.add_argument("--timeout", type=float, default=120.0, help="seconds per workflow")
    demo.add_argument(
        "--approve",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="approve the demo's tool call itself (--no-approve: wait for `chorus approve ID` "
        "from another terminal; default: wait when stdin is a terminal, else approve)",
    )
    demo.set_defaults(func=run_demo)

    up = sub.add_parser(
        "up",
        help="run the whole system locally, each part its own process",
        description="Start an embedded nats-server (data in --data-dir), the coordinator, the "
        "orchestrator, the gateway and agents (the examples unless --agent is given), with a "
        "live status table. Children that exit are restarted. Ctrl-C stops everything.",
        epilog="examples:\n  chorus up\n  chorus up --agent researcher=3 --agent my-agent.yaml\n"
        "  chorus up --cluster 3            # three nats-servers, 3 replicas of everything\n"
        "  set -a; . .chorus/auth/creds/operator.env; set +a; chorus tail   # another terminal",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument("--data-dir", default=".chorus", help="JetStream data and logs (.chorus)")
    up.add_argument("--port", type=int, default=4222, help="NATS client port (4222)")
    up.add_argument(
        "--cluster",
        type=int,
        default=1,
        metavar="N",
        help="run N clustered nats-servers (client ports PORT..PORT+N-1; 0 for free ports) "
        "and keep N replicas of every stream and bucket (CHORUS_REPLICAS=N)",
    )
    up.add_argument("--gateway-port", type=int, default=8080, help="HTTP port (8080)")
    up.add_argument("--no-gateway", action="store_true", help="do not start the gateway")
    up.add_argument(
        "--no-auth",
        action="store_true",
        help="no NATS authorization (by default each process gets its own nkey credentials)",
    )
    up.add_argument(
        "--agent",
        action="append",
        default=[],
        metavar="SPEC[=N]",
        help="an agent spec file or example name, N replicas; repeatable",
    )
    up.set_defaults(func=run_up)


async def agent_run(args: argparse.Namespace, settings: Settings) -> int:
    from chorus.agent.process import serve

    return await serve(args.spec, settings, instance=args.instance)


async def coordinator_run(args: argparse.Namespace, settings: Settings) -> int:
    from chorus.coordinator.process import serve

    return await serve(settings)


def _listed(setting: str, flags: list[str]) -> list[str]:
    """A comma-separated setting (from the environment) and the repeated flag, together."""
    return [item.strip() for item in setting.split(",") if item.strip()] + flags


def register_keys(gateway: Any) -> None:
    """`chorus gateway key add|list|remove`: the gateway's API keys file."""
    from chorus.gateway.keys import SCOPES

    key = gateway.add_subparsers(dest="gateway_command", metavar="key").add_parser(
        "key", help="make, list and remove the gateway's API keys"
    )
    actions = key.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    add = actions.add_parser(
        "add",
        help="make a key, store its hash and print the key (once: it is stored nowhere)",
        epilog="example: chorus gateway key add ci --scope read --scope execute --keys keys.jsonl",
    )
    add.add_argument("name", metavar="NAME")
    add.add_argument("--scope", action="append", choices=SCOPES, required=True)
    listing = actions.add_parser("list", help="the keys' names and scopes")
    remove = actions.add_parser("remove", help="revoke a key (restart the gateway to apply)")
    remove.add_argument("name", metavar="NAME")
    for action in (add, listing, remove):
        action.add_argument(
            "--keys",
            metavar="FILE",
            help="the keys file [env CHORUS_GATEWAY_KEYS]",
        )
        action.set_defaults(func=gateway_key, service=False)


async def gateway_run(args: argparse.Namespace, settings: Settings) -> int:
    from chorus.gateway.options import GatewayOptions
    from chorus.gateway.process import serve

    host = settings.gateway_host if args.host is None else args.host
    port = settings.gateway_port if args.port is None else args.port
    options = GatewayOptions.build(
        host,
        keys_file=args.keys or settings.gateway_keys or None,
        no_auth=args.no_auth,
        allowed_hosts=_listed(settings.gateway_allowed_hosts, args.allowed_host),
        allowed_origins=_listed(settings.gateway_allowed_origins, args.allowed_origin),
        max_waiting=settings.gateway_max_waiting if args.max_waiting is None else args.max_waiting,
    )
    return await serve(settings, host, port, options)


async def gateway_key(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from chorus.errors import ConfigError
    from chorus.gateway.keys import add_key, read_keys, remove_key

    if not (args.keys or settings.gateway_keys):
        raise ConfigError("give the keys file: --keys FILE (env CHORUS_GATEWAY_KEYS)")
    path = Path(args.keys or settings.gateway_keys)
    if args.key_command == "add":
        key = add_key(path, args.name, args.scope)
        print(key)
        print(
            f"key {args.name!r} ({', '.join(args.scope)}) added to {path}; it is shown only "
            "now. Send it as `Authorization: Bearer <key>`; restart the gateway to accept it.",
            file=sys.stderr,
        )
    elif args.key_command == "list":
        for stored in read_keys(path):
            print(f"{stored.name}\t{','.join(stored.scopes)}")
    else:
        remove_key(path, args.name)
        print(f"key {args.name!r} removed from {path}; restart the gateway", file=sys.stderr)
    return 0


async def orchestrator_run(args: argparse.Namespace, settings: Settings) -> int:
    from chorus.orchestrator.process import serve

    return await serve(settings, durable_tasks=not args.direct, processor_modules=args.processors)


async def print_schema(args: argparse.Namespace, settings: Settings) -> int:
    from chorus.messages import schemas

    json.dump(schemas(), sys.stdout, indent=2)
    print()
    return 0


async def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from chorus.demo import run_demo as demo

    return await demo(
        settings,
        args.data_dir,
        args.task,
        attach=args.attach,
        timeout=args.timeout,
        approve=args.approve,
    )


async def run_up(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from chorus.up import default_agents, parse_agent
    from chorus.up import run_up as up

    agents = [parse_agent(a) for a in args.agent] or default_agents()
    gateway_port = None if args.no_gateway else args.gateway_port
    return await up(
        Path(args.data_dir),
        args.port,
        gateway_port,
        agents,
        settings.prefix,
        auth=not args.no_auth,
        cluster=args.cluster,
    )
