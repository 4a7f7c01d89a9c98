"""`chorus auth init`: nkey credentials and a least-privilege nats-server config."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import Any

from chorus.config import Settings


def example_specs() -> list[str]:
    """The agent specs shipped in chorus/examples/agents."""
    folder = resources.files("chorus.examples") / "agents"
    return sorted(str(entry) for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def register(sub: Any) -> None:
    from chorus.auth.principals import SERVICES

    auth = sub.add_parser("auth", help="generate NATS credentials and permissions")
    auth_sub = auth.add_subparsers(dest="auth_command", required=True, metavar="ACTION")
    init = auth_sub.add_parser(
        "init",
        help="write nats-server.conf, nats-auth.conf and creds/<principal>.{nk,env}",
        description="Write a nats-server config whose users are one nkey per agent name (from "
        "the specs: capabilities, subscribes, publishes, state) and per service, each allowed "
        "only what its work needs. Existing seeds are kept unless --rotate.",
        epilog="example: chorus auth init --dir deploy/auth --agents agents/*.yaml\n"
        "then: nats-server -c deploy/auth/nats-server.conf -js -sd /data\n"
        "and, per process: set -a; . deploy/auth/creds/agent-writer.env; set +a",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument("--dir", default="nats-auth", help="output folder [default nats-auth]")
    init.add_argument(
        "--agents",
        nargs="+",
        metavar="SPEC",
        help="agent specs (YAML or package.module:agent) [default: the example agents]",
    )
    init.add_argument(
        "--services",
        nargs="+",
        default=list(SERVICES),
        choices=list(SERVICES),
        help="service principals to create [default: all]",
    )
    init.add_argument(
        "--monitor",
        default="127.0.0.1:8222",
        help="monitoring listen address, or 'off' [default 127.0.0.1:8222: no auth there]",
    )
    init.add_argument("--rotate", action="store_true", help="new seeds for every principal")
    init.add_argument("--tls-cert", metavar="PEM", help="the server's TLS certificate: TLS on")
    init.add_argument("--tls-key", metavar="PEM", help="the server's TLS private key")
    init.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="the CA clients trust (written to each env file as NATS_TLS_CA); with "
        "--tls-verify also the CA that must have signed client certificates",
    )
    init.add_argument(
        "--tls-verify", action="store_true", help="require client certificates (mTLS)"
    )
    init.set_defaults(func=auth_init)


async def auth_init(args: argparse.Namespace, settings: Settings) -> int:
    from chorus.agent.loader import load_agent
    from chorus.auth import init_auth
    from chorus.errors import ConfigError
    from chorus.nats.server import ServerTls

    specs = [load_agent(reference).spec for reference in (args.agents or example_specs())]
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        tls = ServerTls(
            cert_file=args.tls_cert,
            key_file=args.tls_key,
            ca_file=args.tls_ca,
            verify=args.tls_verify,
        )
    elif args.tls_ca or args.tls_verify:
        raise ConfigError("--tls-ca and --tls-verify need --tls-cert and --tls-key")
    layout = init_auth(
        Path(args.dir),
        specs,
        prefix=settings.prefix,
        services=args.services,
        monitor=None if args.monitor == "off" else args.monitor,
        task_timeout_s=settings.task_timeout,
        rotate=args.rotate,
        tls=tls,
    )
    print(f"wrote {layout.server_config} (includes {layout.auth_include.name})")
    for principal in layout.principals:
        print(f"  {principal.name:<24} {layout.env_file(principal.name)}")
    return 0
