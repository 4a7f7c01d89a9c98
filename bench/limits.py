"""Shared provider limits: what the limiter adds to a model call, and how close it keeps a
fleet to its allowance without passing it.

One embedded nats-server; every contending process is a real child (`bench.limits_worker`).

1. Cost per call: N processes (1, 4, 16), each with CALLERS concurrent loops of admit ->
   a simulated model call -> settle, on one shared limit (requests, tokens and concurrency,
   never full, so the figure is the mechanism's, not a wait), then the same loops holding
   and settling each call in one run's budget account. Against, in the same run: a
   raw KV get + compare-and-set (one process), and a raw cross-process core request-reply
   (the least a limiter service would cost per call).
2. Ceiling and usage: N processes (4, 16) calling the fake OpenAI server (in this process)
   through the real openai client behind `LimitedModel`, with more demand than a 60 RPM /
   20,000 TPM limit allows, once with small calls (requests bind) and once with large ones
   (tokens bind). The server counts what it received: the most in any window, and the
   share of the binding limit used.

    python -m bench.limits                  # 60 s windows, 3 of them per case: ~13 min
    python -m bench.limits --window 10      # scaled-down windows: ~2.5 min
    python -m bench.limits --smoke          # 2 s windows, fewer calls: ~1 min
    python -m bench.limits --only budgets   # one part: limits, budgets or ceiling
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.js.api import KeyValueConfig, StorageType
from tests.fake_openai import FakeOpenAI

from bench.harness import cli
from bench.harness.baselines import RESPONDER
from bench.harness.fleet import child_env
from bench.harness.stats import pct
from bench.harness.tables import environment_lines, markdown_table
from chorus.nats.server import NatsServer
from chorus.specs.budget import RunBudget
from chorus.spend.budgets import BudgetLedger
from chorus.subjects import Subjects

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 120.0
RPM, TPM = 60, 20_000


@dataclass(frozen=True)
class Sizes:
    smoke: bool
    processes: tuple[int, ...]
    calls: int  # per caller, cost phase
    callers: int
    model_ms: float
    window_s: float
    windows: int  # measured per ceiling case


def sizes(args: argparse.Namespace) -> Sizes:
    if args.smoke:
        return Sizes(True, (1, 4, 16), calls=20, callers=2, model_ms=20, window_s=2.0, windows=3)
    return Sizes(
        False, (1, 4, 16), calls=200, callers=4, model_ms=50, window_s=args.window, windows=3
    )


async def workers(count: int, args: list[str], workdir: Path, name: str) -> list[dict[str, Any]]:
    """Start `count` workers, release them together once all are ready, collect their JSON."""
    env = child_env("", "")  # the checkout's code first on the path; the rest is in args
    procs = []
    for i in range(count):
        log = (workdir / f"{name}-{i}.log").open("wb")
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.limits_worker",
                *args,
                cwd=ROOT,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        )
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT_S)
            if line.strip() != b"ready":
                raise RuntimeError(f"a worker did not start: {line!r}; see {workdir}/{name}-*.log")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        out = []
        for proc in procs:
            assert proc.stdout is not None
            out.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), TIMEOUT_S * 10)))
            await proc.wait()
        return out
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def margin_for(window_s: float) -> float | None:
    """Scaled-down windows keep a margin for this machine's delays (admission to arrival),
    which do not scale down with them; 60 s windows keep the default (one slot, 1 s)."""
    return 0.15 if window_s < 20 else None


def write_limits(
    path: Path, window_s: float, requests: int, tokens: int, concurrent: int, reserve: int
) -> Path:
    margin = margin_for(window_s)
    path.write_text(
        f"window_s: {window_s}\n"
        f"reserve_output_tokens: {reserve}\n"
        "limits:\n"
        "  - name: bench-key\n"
        "    api_key: OPENAI_API_KEY\n"
        f"    requests_per_minute: {requests}\n"
        f"    tokens_per_minute: {tokens}\n"
        + (f"    concurrent: {concurrent}\n" if concurrent else "")
        + (f"    margin_s: {margin}\n" if margin is not None else "")
    )
    return path


# 1. cost per call


async def raw_cas(url: str, calls: int) -> list[int]:
    """A KV get then a compare-and-set update, one at a time (what one booking would be
    without the mirror)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    kv = await js.create_key_value(
        KeyValueConfig(bucket="benchraw-limits", history=1, storage=StorageType.FILE, direct=True)
    )
    await kv.put("k", b"{}")
    out = []
    for _ in range(calls):
        started = time.perf_counter_ns()
        entry = await kv.get("k")
        await kv.update("k", b'{"slots": [[1, 1, 500]]}', last=entry.revision)
        out.append(time.perf_counter_ns() - started)
    await nc.close()
    return out


async def raw_request_reply(url: str, calls: int) -> list[int]:
    """Core request-reply to a nats-py responder process: a limiter service's floor."""
    responder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RESPONDER,
        url,
        "benchraw.limiter",
        stdout=asyncio.subprocess.PIPE,
    )
    assert responder.stdout is not None
    await asyncio.wait_for(responder.stdout.readline(), TIMEOUT_S)
    nc = await nats.connect(url)
    out = []
    try:
        for _ in range(calls):
            started = time.perf_counter_ns()
            await nc.request("benchraw.limiter", b'{"tokens": 500}', timeout=5)
            out.append(time.perf_counter_ns() - started)
    finally:
        await nc.close()
        responder.terminate()
        await responder.wait()
    return out


def us(ns: float) -> str:
    return f"{ns / 1000:.0f} µs" if ns < 10_000_000 else f"{ns / 1e6:.1f} ms"


async def cost(url: str, size: Sizes, workdir: Path, only: str | None = None) -> None:
    plain = write_limits(workdir / "limits-cost.yaml", 60, 10**9, 10**12, 0, 0)
    concurrent = write_limits(workdir / "limits-cost-conc.yaml", 60, 10**9, 10**12, 10**6, 0)
    cases = [(n, plain, "") for n in size.processes]
    if not size.smoke:
        cases.append((size.processes[-1], concurrent, ", with a concurrency limit"))
    if only == "budgets":
        cases = []
    rows = []
    for n, limits, what in cases:
        prefix = f"benchcost{n}{'c' if what else ''}"
        args = [
            "latency",
            url,
            prefix,
            str(limits),
            str(size.callers),
            str(size.calls),
            str(size.model_ms),
        ]
        results = await workers(n, args, workdir, f"cost-{prefix}")
        admits = [x for r in results for x in r["admit_ns"]]
        writes = sum(r["writes"] for r in results)
        conflicts = sum(r["conflicts"] for r in results)
        rows.append(
            [
                f"limiter admit, {n} process{'es' if n > 1 else ''}{what}",
                f"{len(admits)}",
                us(pct(admits, 0.5)),
                us(pct(admits, 0.99)),
                f"{writes / len(admits):.2f}",
                f"{conflicts / max(1, writes):.2f}",
            ]
        )
    budget_cases = [(1, size.callers, size.calls, size.model_ms, "")]
    # (the smoke run starts 4 processes here, not 16: it only checks that it works)
    contenders = 4 if size.smoke else size.processes[-1]
    budget_cases.append((contenders, size.callers, size.calls, size.model_ms, ""))
    if not size.smoke:  # the same fleet at the pace of real model calls
        budget_cases.append((size.processes[-1], 4, 10, 1000.0, ", 1 s model calls"))
    if only == "limits":
        budget_cases = []
    for n, callers, calls, model_ms, what in budget_cases:
        prefix = f"benchbudget{n}{'slow' if what else ''}"
        nc = await nats.connect(url)
        ledger = await BudgetLedger.open(nc.jetstream(), Subjects(prefix))
        await ledger.open_run("bench", RunBudget(tokens=10**12))
        await nc.close()
        args = [
            "budget",
            url,
            prefix,
            "bench",
            str(callers),
            str(calls),
            str(model_ms),
        ]
        results = await workers(n, args, workdir, f"cost-{prefix}")
        holds = [x for r in results for x in r["hold_ns"]]
        settles = [x for r in results for x in r["settle_ns"]]
        conflicts = sum(r["conflicts"] for r in results)
        rows.append(
            [
                f"budget hold + settle, {n} process{'es' if n > 1 else ''}, one run{what}",
                f"{len(holds)}",
                f"{us(pct(holds, 0.5))} + {us(pct(settles, 0.5))}",
                f"{us(pct(holds, 0.99))} + {us(pct(settles, 0.99))}",
                "2",
                f"{conflicts / (2 * len(holds)):.2f}",
            ]
        )
    kv = await raw_cas(url, 200 if size.calls > 20 else 50)
    rr = await raw_request_reply(url, 200 if size.calls > 20 else 50)
    rows.append(
        [
            "raw KV get + CAS update, 1 process",
            f"{len(kv)}",
            us(pct(kv, 0.5)),
            us(pct(kv, 0.99)),
            "—",
            "—",
        ]
    )
    rows.append(
        [
            "raw core request-reply (a limiter service's floor)",
            f"{len(rr)}",
            us(pct(rr, 0.5)),
            us(pct(rr, 0.99)),
            "—",
            "—",
        ]
    )
    print(
        f"## Limiter cost per model call ({size.callers} concurrent calls per process, "
        f"{size.model_ms:g} ms simulated model call, one shared limit)\n"
    )
    print(
        markdown_table(
            [
                "",
                "calls",
                "admit p50",
                "admit p99",
                "KV writes per call",
                "CAS conflicts per write",
            ],
            rows,
        )
    )
    print()


# 2. ceiling and usage


@dataclass
class Case:
    label: str
    words: int  # of each call's input; the fake echoes it, so about twice that in tokens
    binding: str


CASES = (
    Case("small calls (~60 tokens)", 28, "requests"),
    Case("large calls (~900 tokens)", 448, "tokens"),
)


async def ceiling(url: str, size: Sizes, workdir: Path) -> None:
    rows = []
    window = size.window_s
    # The smoke run starts 16 processes once: 4 with small calls, 16 with large ones.
    plan = [(c, n) for c in CASES for n in (4, 16)]
    if size.smoke:
        plan = [(CASES[0], 4), (CASES[1], 16)]
    for case, n in plan:
        # expected output = the input's words: the echo (the fake's tokens are words)
        reserve = case.words + 8
        limits = write_limits(workdir / "limits-ceiling.yaml", window, RPM, TPM, 0, reserve)
        callers = 4 if n == 4 else 2
        with FakeOpenAI() as fake:
            prefix = f"benchceil{n}{case.binding}"
            seconds = window * size.windows
            args = [
                "demand",
                url,
                prefix,
                str(limits),
                str(callers),
                str(seconds),
                str(case.words),
                fake.base_url,
            ]
            results = await workers(n, args, workdir, f"ceiling-{n}-{case.binding}")
            arrivals = sorted(a for a in fake.arrivals if a.model == "gpt-bench")
        calls = sum(r["calls"] for r in results)
        most_requests, most_tokens = peak(arrivals, window)
        used = steady_use(arrivals, window, case.binding)
        rows.append(
            [
                f"{n} processes, {case.label}",
                f"{calls}",
                case.binding,
                f"{most_requests} (limit {RPM})",
                f"{most_tokens:,} (limit {TPM:,})",
                "—" if used is None else f"{used:.1%}",
            ]
        )
    margin = margin_for(window)
    print(
        f"## Shared {RPM} RPM / {TPM:,} TPM limit over {window:g} s windows "
        f"(margin {margin if margin is not None else window / 60:g} s), demand above it, "
        f"{size.windows} windows per case\n"
    )
    print(
        markdown_table(
            [
                "",
                "calls",
                "binds",
                "most requests in any window",
                "most tokens in any window",
                "binding limit used (steady state)",
            ],
            rows,
        )
    )
    print()


def steady_use(arrivals: list[Any], window: float, binding: str) -> float | None:
    """The share of the binding limit used: what arrived per window, from the first
    arrival to the start of the last burst (with a backlog, calls go in bursts as the
    oldest slot leaves the window: the last burst ends the measured time, uncounted)."""
    if len(arrivals) < 2:
        return None
    last_burst = min(a.time for a in arrivals if a.time >= arrivals[-1].time - window / 20)
    before = [a for a in arrivals if a.time < last_burst]
    span = last_burst - arrivals[0].time
    if span < window:
        return None
    if binding == "requests":
        return len(before) * window / span / RPM
    return sum(a.tokens for a in before) * window / span / TPM


def peak(arrivals: list[Any], window: float) -> tuple[int, int]:
    most_requests = most_tokens = end = tokens = 0
    for start, first in enumerate(arrivals):
        while end < len(arrivals) and arrivals[end].time < first.time + window:
            tokens += arrivals[end].tokens
            end += 1
        most_requests = max(most_requests, end - start)
        most_tokens = max(most_tokens, tokens)
        tokens -= first.tokens
    return most_requests, most_tokens


async def main_async(args: argparse.Namespace, workdir: Path) -> None:
    size = sizes(args)
    for line in environment_lines(
        " ".join(["python -m bench.limits", *sys.argv[1:]]),
        ("nats-py", "msgspec", "openai"),
    ):
        print(line)
    print()
    with NatsServer(workdir / "jetstream") as server:
        if args.only != "ceiling":
            await cost(server.url, size, workdir, args.only)
        if args.only in (None, "ceiling"):
            await ceiling(server.url, size, workdir)


def main() -> int:
    parser = cli.parser("bench.limits", __doc__)
    parser.add_argument("--window", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument(
        "--only",
        choices=["limits", "budgets", "ceiling"],
        help="one part: the limiter's cost, the budgets' cost, or the ceiling and usage",
    )
    return cli.run(main_async, parser.parse_args(), "chorus-limits-")


if __name__ == "__main__":
    raise SystemExit(main())
