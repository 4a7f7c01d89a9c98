"""Helpers the benchmark scripts share: child processes, CPU readings, Markdown tables."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TIMEOUT_S = 30.0  # how long a child may take to stop before it is killed
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time every process on the machine has used so far (all cores), from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / CLOCK_TICKS  # guest time is already in user


def tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Child:
    """A `python ...` child process, its role and its log."""

    role: str
    process: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise RuntimeError(
                f"{self.role} exited with {self.process.returncode}:\n{tail(self.log)}"
            )

    async def stop(self) -> None:
        """SIGTERM (services drain), then SIGKILL if it is still there after TIMEOUT_S."""
        if self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), TIMEOUT_S)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def spawn(role: str, args: list[str], env: dict[str, str], log: Path) -> Child:
    with log.open("ab") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *args, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    return Child(role, process, log)


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
