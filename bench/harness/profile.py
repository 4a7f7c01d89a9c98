"""Where a run's CPU goes: per-process CPU time read from /proc, the server's message
counters, and py-spy profiles of child processes summarised as tables."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bench.harness.tables import markdown_table

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TIMEOUT_S = 30.0
SERVER_COUNTERS = ("in_msgs", "out_msgs", "in_bytes", "out_bytes")


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


def cpu_by_role(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far by role; `other` is every process outside the run (noise)."""
    totals: dict[str, float] = {}
    for role, members in pids.items():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            totals[role] = sum(cpu_seconds(pid) for pid in members)
    totals["other"] = machine_busy_seconds() - sum(totals.values())
    return totals


def parse_status(text: str) -> dict[str, int]:
    """The `kB` fields of a /proc/<pid>/status (or /proc/meminfo) text."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[key] = int(parts[0])
    return fields


def proc_status(pid: int) -> dict[str, int]:
    return parse_status(Path(f"/proc/{pid}/status").read_text())


def rss_mib(pid: int) -> float:
    return proc_status(pid).get("VmRSS", 0) / 1024


def server_counters(monitor: str) -> dict[str, int]:
    """Messages and bytes through the server so far, from its /varz monitoring endpoint."""
    with urllib.request.urlopen(f"{monitor}/varz", timeout=5) as reply:
        varz = json.load(reply)
    return {key: int(varz[key]) for key in SERVER_COUNTERS}


class Measured(Protocol):
    """What `metered` reads: the processes by role, and the server's monitoring URL."""

    @property
    def monitor(self) -> str | None: ...

    def snapshot(self) -> dict[str, float]: ...


@dataclass
class Usage:
    """What a block cost: CPU % of one core by role, the CPU seconds of the run's own
    processes (`other` excluded), and the server's counters (messages, bytes)."""

    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    busy_s: float = 0.0
    server: dict[str, int] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def metered(run: Measured) -> AsyncIterator[Usage]:
    """The block's Usage, filled in when the block ends."""
    usage = Usage()
    monitor = run.monitor
    counters = await asyncio.to_thread(server_counters, monitor) if monitor else {}
    before, started = run.snapshot(), time.perf_counter()
    yield usage
    after, usage.seconds = run.snapshot(), time.perf_counter() - started
    roles = [r for r in after if r in before]
    usage.cpu = {r: 100 * max(after[r] - before[r], 0) / usage.seconds for r in roles}
    usage.busy_s = sum(after[r] - before[r] for r in roles if r != "other")
    if monitor:
        now = await asyncio.to_thread(server_counters, monitor)
        usage.server = {k: now[k] - counters[k] for k in counters}


def require_py_spy() -> None:
    if shutil.which("py-spy") is None:
        sys.exit("--profile needs py-spy: pip install py-spy")


@contextlib.asynccontextmanager
async def profiled(
    directory: Path | None, phase: str, targets: dict[str, int], rate: int = 250
) -> AsyncIterator[None]:
    """py-spy each target process (role -> pid) for the block; print where its CPU went.
    Nothing happens when `directory` is None."""
    if directory is None:
        yield
        return
    spies: list[tuple[str, Path, asyncio.subprocess.Process]] = []
    for role, pid in targets.items():
        out = directory / f"{phase}-{role}.txt"
        spy = await asyncio.create_subprocess_exec(
            *("py-spy", "record", "--pid", str(pid), "--format", "raw", "--function"),
            *("--nonblocking", "--rate", str(rate), "--output", str(out)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        spies.append((role, out, spy))
    await asyncio.sleep(0.5)  # py-spy attaches asynchronously; give it a moment
    try:
        yield
    finally:
        for _, _, spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for role, out, spy in spies:
            await asyncio.wait_for(spy.wait(), TIMEOUT_S)
            if out.exists():
                print(f"\n#### py-spy: {phase}, {role} ({out})\n")
                print(summarise_profile(out.read_text()))


def summarise_profile(raw: str, top: int = 15) -> str:
    """Where a process spends its on-CPU samples, from py-spy's raw (folded) output.

    Self time per function, then inclusive time of the Chorus, nats-py and msgspec
    functions (the event loop's own frames, which contain everything, are left out).
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "(no samples)"

    def interesting(frame: str) -> bool:
        ours = any(part in frame for part in ("chorus/", "services/", "nats/", "msgspec"))
        return ours and inclusive[frame] < 0.97 * total

    rows = [[f"`{f}`", f"{n / total:.1%}"] for f, n in own.most_common(top)]
    lines = [f"{total} on-CPU samples", "", markdown_table(["function (self)", "share"], rows)]
    ranked = sorted((f for f in inclusive if interesting(f)), key=lambda f: -inclusive[f])
    rows = [[f"`{f}`", f"{inclusive[f] / total:.1%}"] for f in ranked[:top]]
    lines += ["", markdown_table(["Chorus / nats-py function (inclusive)", "share"], rows)]
    return "\n".join(lines)


async def dump_stacks(pid: int) -> None:
    """What a process is doing right now (py-spy dump, to stderr), when py-spy is installed."""
    if shutil.which("py-spy") is None:
        return
    dump = await asyncio.create_subprocess_exec(
        "py-spy", "dump", "--pid", str(pid), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(dump.communicate(), TIMEOUT_S)
    print(out.decode(errors="replace"), file=sys.stderr)
