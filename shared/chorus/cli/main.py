"""`chorus`: entry point, argument parsing, and the one place errors become one readable line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from nats.errors import Error as NatsError

from chorus.config import Settings
from chorus.errors import ChorusError
from chorus.logs import setup_logging
from chorus.telemetry.setup import configure_tracing

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        nats_url=getattr(args, "nats_url", None), prefix=getattr(args, "prefix", None)
    )


DISTRIBUTION = "chorus-agents"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _add_global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """The options every command takes, before or after the command's name. Under a command
    their default is SUPPRESS, so an option given before the command is not reset there."""
    parser.add_argument(
        "--nats-url", default=default, help="NATS server URL(s), comma-separated [env NATS_URL]"
    )
    parser.add_argument(
        "--prefix", default=default, help="subject prefix [env CHORUS_PREFIX, default chorus]"
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=default,
        help="log format (default: json for services, text otherwise)",
    )


def _commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every command's parser under `parser`, nested ones too (`runs show`, `state get`)."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
                found += [child, *_commands(child)]
    return found


def build_parser() -> argparse.ArgumentParser:
    from chorus.cli import commands

    parser = argparse.ArgumentParser(
        prog="chorus",
        description="Run teams of LLM agents as separate processes over NATS.",
        epilog="Connection settings come from NATS_URL, NATS_CREDS, ... (see the README table). "
        "--nats-url, --prefix and --log-format may also follow the command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_global_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.register(sub)
    for command in _commands(parser):
        _add_global_options(command, argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command = args.func
    service = bool(getattr(args, "service", False))
    log_format = args.log_format or ("json" if service else "text")
    try:
        settings = _settings(args)
        # Services log what they do; interactive commands only warnings, unless asked.
        level = settings.log_level if service or "CHORUS_LOG_LEVEL" in os.environ else "WARNING"
        setup_logging(level, json_lines=log_format == "json")
        # Spans are exported when OTEL_* (or CHORUS_TRACE_FILE) asks; flushed before exit.
        stop_tracing = configure_tracing(f"chorus-{args.command}", trace_file=settings.trace_file)
        try:
            return asyncio.run(command(args, settings))
        finally:
            if stop_tracing is not None:
                stop_tracing()
    except ChorusError as exc:
        print(f"chorus: error: {exc.reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `chorus ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0
    except (NatsError, OSError, TimeoutError) as exc:
        print(
            f"chorus: error: {type(exc).__name__}: {exc} (is the server healthy?)", file=sys.stderr
        )
        return 2
