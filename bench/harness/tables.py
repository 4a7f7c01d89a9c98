"""How the benchmarks print: Markdown tables (pasted as they are into docs/performance.md)
and the lines that say which machine, versions and code a run measured."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path

from chorus.nats.server import find_binary

ROOT = Path(__file__).resolve().parents[2]


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def server_version() -> str:
    """`nats-server: vX.Y.Z`, as the binary Chorus would start reports it."""
    return subprocess.run(
        [find_binary(), "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def versions_line() -> str:
    """One `#` line: nats-server, nats-py, msgspec, Python and the CPU count."""
    return (
        f"# {server_version()}, nats-py {version('nats-py')}, msgspec {version('msgspec')}, "
        f"Python {platform.python_version()}, {os.cpu_count()} cpus"
    )


def environment_lines(command: str, packages: Iterable[str] = ("nats-py", "msgspec")) -> list[str]:
    """Markdown list items: date, commit, machine, versions and the command of this run."""
    cpu, memory_kb = "unknown CPU", 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    listed = ", ".join(f"{name} {version(name)}" for name in packages)
    return [
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- code: {commit or 'unknown'}",
        f"- machine: {cpu}, {os.cpu_count()} CPUs, {memory_kb / 2**20:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}; {listed}; {server_version()}",
        f"- command: `{command}`",
    ]
