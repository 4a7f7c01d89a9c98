"""`chorus completion bash|zsh|fish`: a shell completion script made from the parser itself
(by shtab), so it always names the commands and options this version has."""

from __future__ import annotations

import argparse
from typing import Any

from chorus.config import Settings

SHELLS = ("bash", "zsh", "fish")
INSTALL = {
    "bash": "chorus completion bash > ~/.local/share/bash-completion/completions/chorus",
    "zsh": "chorus completion zsh > ~/.zfunc/_chorus   # with fpath+=~/.zfunc before compinit",
    "fish": "chorus completion fish > ~/.config/fish/completions/chorus.fish",
}


def register(sub: Any) -> None:
    completion = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh or fish)",
        description="Print a completion script for SHELL on stdout; install it once.",
        epilog="install:\n" + "\n".join(f"  {line}" for line in INSTALL.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    completion.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash, zsh or fish")
    completion.set_defaults(func=print_completion)


def script(shell: str) -> str:
    """The completion script of the whole `chorus` command line for `shell`."""
    import shtab

    from chorus.cli.main import build_parser

    return str(shtab.complete(build_parser(), shell=shell))


async def print_completion(args: argparse.Namespace, settings: Settings) -> int:
    print(script(args.shell))
    return 0
