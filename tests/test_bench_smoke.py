"""Every benchmark script runs in its smoke mode and prints its key figures.

The benches print numbers and never assert times; this only checks that each one still
works end to end (`python -m bench.<name> --smoke`, from the repository root) and that the
lines the docs quote are there. Together they take about 40 s on 2 cores.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 120

KEY_LINES: dict[str, list[str]] = {
    "tool_loop": [
        "| loop overhead per tool turn, 1 call |",
        "| raw cross-process request-reply, sequential |",
        "- loop overhead per tool turn p50",
    ],
    "streaming": [
        "| added by Chorus to the first token |",
        "| raw JetStream publish (acked) → ordered consumer |",
        "- added to the first token p50",
    ],
    "mcp_tool": ["MCP stdio tool call (McpSource)", "same function in process", "MCP overhead"],
    "kv_contention": ["SharedState.update", "raw kv.update CAS", "SharedState / raw"],
    "cluster": [
        "durable, 1 node, R1, 100 in flight",
        "durable, 3 nodes, R3, 100 in flight",
        "| durable tasks/s, 100 in flight |",
    ],
    "agent_startup": [
        "| offline model |",
        "| import nats, msgspec |",
        "- offline: VmRSS idle ≤ 35 MiB: median",
    ],
    "coordinator_load": [
        "| coordinator CPU (% of one core) |",
        "| registry KV writes (`$KV.<prefix>-agents.>`) |",
        "| rest of the machine (noise) |",
    ],
    "routing": [
        "raw cross-process request-reply, sequential",
        "raw JetStream work-queue round trip, 100 in flight",
        "chorus durable, 4 agents, 100 in flight",
        "| direct `run_task` p50 vs raw request-reply p50 |",
        "| durable `TaskQueue.run` p50 vs raw work-queue p50 |",
        "## Cost per request",
        "chorus durable `TaskQueue.run`: medians of",
    ],
    "peer_tool": [
        "peer tool, direct",
        "peer tool, durable",
        "| peer tool direct p50 vs raw request-reply p50 |",
        "| peer tool durable p50 vs raw work-queue p50 |",
    ],
    "limits": [
        "| limiter admit, 1 process |",
        "| limiter admit, 16 processes |",
        "| raw core request-reply (a limiter service's floor) |",
        "| 4 processes, small calls (~60 tokens) |",
        "| 16 processes, large calls (~900 tokens) |",
        "most requests in any window",
    ],
    "orchestration": [
        "| cross-process core request-reply, sequential |",
        "per step / raw WQ p50",
        "per task / raw req-reply (100 in flight)",
        "Where a pipeline step's time goes, durable path",
        "| KV store + NATS progress (as the orchestrator) |",
        "- pipeline step, durable: p50",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(KEY_LINES))
def test_bench_script_runs_in_smoke_mode_and_prints_its_figures(script: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{script}", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    report = f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, report
    for line in KEY_LINES[script]:
        assert line in done.stdout, f"{line!r} missing\n{report}"
