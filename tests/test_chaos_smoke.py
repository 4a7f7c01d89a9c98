"""The chaos suite's smoke run keeps every promise Chorus makes about kill -9.

`python -m bench.chaos --smoke --json` starts a real system (nats-server, coordinator,
orchestrator, two agents, all separate processes), submits durable tasks (some of them
poison) and workflow runs, and kills one agent, the coordinator, the orchestrator and the
nats-server with SIGKILL while they work. The counts it reports are read from the stores.
Timings are printed by the bench, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def chaos_report() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--smoke", "--json", "--seed", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(
            f"no JSON report (exit {done.returncode}):\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    report["exit_code"] = done.returncode
    return report


@pytest.mark.slow
def test_every_kind_of_process_was_killed_and_came_back(chaos_report: dict[str, Any]) -> None:
    kinds = sorted(fault["kind"] for fault in chaos_report["faults"])
    assert kinds == ["agents", "coordinator", "orchestrator", "server"]
    assert all(fault["down_s"] > 0 for fault in chaos_report["faults"])


@pytest.mark.slow
def test_no_task_is_lost_and_no_outcome_is_written_twice(chaos_report: dict[str, Any]) -> None:
    counts = chaos_report["counts"]
    assert counts["tasks_accepted"] == counts["tasks_submitted"] > 0
    assert counts["outcomes_stored"] == counts["tasks_accepted"]
    assert counts["lost"] == 0
    assert counts["outcomes_written_twice"] == 0


@pytest.mark.slow
def test_poison_tasks_are_dead_lettered_exactly_once(chaos_report: dict[str, Any]) -> None:
    counts = chaos_report["counts"]
    assert counts["poison"] > 0
    assert counts["dead_letters"] == counts["poison"]
    check = next(c for c in chaos_report["checks"] if c["name"].startswith("poison"))
    assert check["ok"], check["detail"]  # and the letters are for the poison tasks, not others


@pytest.mark.slow
def test_every_run_completed(chaos_report: dict[str, Any]) -> None:
    counts = chaos_report["counts"]
    assert counts["runs_submitted"] > 0
    assert counts["runs_completed"] == counts["runs_submitted"]


@pytest.mark.slow
def test_every_submitter_heard_the_stored_outcome_and_the_run_exits_zero(
    chaos_report: dict[str, Any],
) -> None:
    broken = [f"{c['name']}: {c['detail']}" for c in chaos_report["checks"] if not c["ok"]]
    assert broken == []
    assert chaos_report["ok"] is True
    assert chaos_report["exit_code"] == 0
