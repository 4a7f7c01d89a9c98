"""What `bench.chaos` reports: counts, checks, timings and each fault's recovery, as a
dict (the `--json` output) and as rich tables.

A fault's "served again" is the first outcome the tasks bucket stored after the kill (for
the orchestrator, the first step record written): outcomes are written only by the
coordinator, so it measures the whole path. "Caught up" is the time from the kill until
every task whose first fault it was had its outcome (for the orchestrator: every run it was
the first orchestrator kill of had finished); a task lives through a fault when it was
submitted before the kill and stored after it. Tasks are attributed to agent, coordinator
and server kills, runs to orchestrator kills.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from bench.chaos_audit import Check, Resubmission, RunSubmission, Stores, Submission
from bench.chaos_fleet import Fault
from bench.harness.stats import Figure, pct
from bench.harness.tables import environment_lines
from chorus.config import Settings

BURST_IN_FLIGHT = 100


@dataclass
class Raw:
    """Raw nats-py on the same server in the same run."""

    request_reply_p50_us: float
    work_queue_p50_us: float
    request_reply_rate: float
    work_queue_rate: float


def percentile_ms(values: list[float], q: float) -> float | None:
    return pct(values, q) * 1000 if values else None


def _first_hit(start: float, end: float | None, kills: list[tuple[int, float]]) -> int | None:
    """The first fault (its index) killed while something lived from `start` to `end`
    (None: it never finished)."""
    for index, killed_at in kills:
        if start < killed_at and (end is None or killed_at < end):
            return index
    return None


def fault_rows(
    faults: list[Fault], tasks: list[Submission], stores: Stores
) -> list[dict[str, Any]]:
    """Each fault: how long its victim was down, after how long the system served again,
    and after how long everything it hit first had finished (module docstring)."""
    outcome_times = sorted(w.at for w in stores.outcomes.values())
    started = min((s.submitted_at for s in tasks if s.submitted_at), default=0.0)
    task_kills = [(n, f.killed_at) for n, f in enumerate(faults) if f.kind != "orchestrator"]
    run_kills = [(n, f.killed_at) for n, f in enumerate(faults) if f.kind == "orchestrator"]
    hit: dict[int, list[float | None]] = defaultdict(list)
    for s in tasks:
        if s.accepted:
            stored = stores.outcomes.get(s.task_id)
            end = stored.at if stored else None
            if (first := _first_hit(s.submitted_at, end, task_kills)) is not None:
                hit[first].append(end)
    for record in stores.runs.values():
        if record is not None:
            end = record.ended_at or None
            if (first := _first_hit(record.created_at, end, run_kills)) is not None:
                hit[first].append(end)
    rows = []
    for n, fault in enumerate(faults):
        served_by = stores.step_writes if fault.kind == "orchestrator" else outcome_times
        served = next((t for t in served_by if t > fault.killed_at), None)
        ends = hit.get(n, [])
        caught: float | None = None  # something it hit never finished
        if all(t is not None for t in ends):
            caught = max((t for t in ends if t is not None), default=fault.killed_at)
            caught -= fault.killed_at
        rows.append(
            {
                "kind": fault.kind,
                "victim": fault.victim,
                "killed_at": fault.killed_at,
                "at_s": fault.killed_at - started,
                "down_s": fault.back_at - fault.killed_at,
                "served_again_s": None if served is None else served - fault.killed_at,
                "caught_up_s": caught,
                "hit": len(ends),
            }
        )
    return rows


def report(
    config: dict[str, Any],
    env: dict[str, str],
    tasks: list[Submission],
    runs: list[RunSubmission],
    again: list[Resubmission],
    stores: Stores,
    checks: list[Check],
    faults: list[Fault],
    raw: Raw,
    burst: Figure | None,
) -> dict[str, Any]:
    settings = Settings.from_env(env)
    accepted = [s for s in tasks if s.accepted]
    stored = [s for s in accepted if s.task_id in stores.outcomes]
    good = [s for s in stored if not s.poison]
    latency = [stores.outcomes[s.task_id].at - s.submitted_at for s in good]
    overhead = [stores.outcomes[s.task_id].at - s.submitted_at - s.work_s for s in good]
    last_submit = max((s.submitted_at for s in accepted), default=0.0)
    last_outcome = max((stores.outcomes[s.task_id].at for s in stored), default=0.0)
    first_submit = min((s.submitted_at for s in accepted), default=0.0)
    completed_runs = sum(
        1 for r in stores.runs.values() if r is not None and r.status == "completed"
    )
    overhead_p50 = percentile_ms(overhead, 0.5)
    bound = 2 * settings.heartbeat_interval + settings.claim_timeout
    throughput: dict[str, Any] = {
        "offered_per_s": config["rate"],
        "achieved_per_s": len(stored) / (last_outcome - first_submit) if stored else None,
        "raw_request_reply_per_s": raw.request_reply_rate,
        "raw_work_queue_per_s": raw.work_queue_rate,
    }
    if burst is not None and burst.rate is not None:
        throughput["burst_per_s"] = burst.rate
        throughput["burst_vs_raw_work_queue"] = burst.rate / raw.work_queue_rate
        throughput["burst_vs_raw_request_reply"] = burst.rate / raw.request_reply_rate
    return {
        "ok": all(c.ok for c in checks),
        "config": {
            **config,
            "children_env": env,
            "heartbeat_interval": settings.heartbeat_interval,
            "claim_timeout": settings.claim_timeout,
            "dead_after": settings.dead_after,
            "dedupe_window": settings.dedupe_window,
        },
        "counts": {
            "tasks_submitted": len(tasks),
            "tasks_accepted": len(accepted),
            "outcomes_stored": len(stored),
            "lost": len(accepted) - len(stored),
            "outcomes_written_twice": sum(
                1 for w in stores.outcomes.values() if len(w.outcomes) > 1
            ),
            "outcome_keys": len(stores.outcomes),
            "poison": sum(1 for s in accepted if s.poison),
            "dead_letters": sum(stores.dead_letters.values()),
            "runs_submitted": len(runs),
            "runs_completed": completed_runs,
            "submitter_errors": sum(1 for s in tasks if s.error),
            "resubmitted": len(again),
            "resubmitted_after_window": sum(1 for r in again if r.age_s > settings.dedupe_window),
        },
        "checks": [asdict(c) for c in checks],
        "timings": {
            "last_submit_to_last_outcome_s": last_outcome - last_submit if stored else None,
            "latency_p50_ms": percentile_ms(latency, 0.5),
            "latency_p99_ms": percentile_ms(latency, 0.99),
            "latency_max_ms": percentile_ms(latency, 1.0),
            "overhead_p50_ms": overhead_p50,
            "overhead_p99_ms": percentile_ms(overhead, 0.99),
            "raw_request_reply_p50_ms": raw.request_reply_p50_us / 1000,
            "raw_work_queue_p50_ms": raw.work_queue_p50_us / 1000,
            "overhead_p50_vs_raw_work_queue": (
                overhead_p50 / (raw.work_queue_p50_us / 1000) if overhead_p50 else None
            ),
            "lateness_bound_s": bound,
        },
        "throughput": throughput,
        "faults": fault_rows(faults, tasks, stores),
        "errors": [f"{s.task_id}: {s.error}" for s in tasks if s.error][:20],
        "slowest": slowest(good, stores),
    }


def slowest(good: list[Submission], stores: Stores, n: int = 5) -> list[dict[str, Any]]:
    """The slowest tasks, with what their stored outcome says of their attempts."""
    ranked = sorted(good, key=lambda s: stores.outcomes[s.task_id].at - s.submitted_at)
    rows = []
    for s in reversed(ranked[-n:]):
        outcome = stores.outcomes[s.task_id].first
        rows.append(
            {
                "task_id": s.task_id,
                "submitted_at": s.submitted_at,
                "latency_s": stores.outcomes[s.task_id].at - s.submitted_at,
                "attempts": outcome.attempts,
                "errors": [f"{e.code} ({e.instance})" for e in outcome.errors],
                "instance": outcome.result.instance if outcome.result else "",
            }
        )
    return rows


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def millis(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f} ms"


def print_rich(result: dict[str, Any], command: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=120)
    for line in environment_lines(command):
        console.print(line, highlight=False, markup=False)
    counts, timings, throughput = result["counts"], result["timings"], result["throughput"]

    table = Table(title="Chaos run")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("tasks submitted", f"{counts['tasks_submitted']} ({counts['poison']} poison)"),
        ("outcomes stored", str(counts["outcomes_stored"])),
        ("lost", str(counts["lost"])),
        ("outcomes written twice", str(counts["outcomes_written_twice"])),
        ("runs completed", f"{counts['runs_completed']} / {counts['runs_submitted']}"),
        ("dead letters", f"{counts['dead_letters']} (poison: {counts['poison']})"),
        (
            "task ids submitted again (after the dedupe window)",
            f"{counts['resubmitted']} ({counts['resubmitted_after_window']})",
        ),
        ("last submit → last outcome", seconds(timings["last_submit_to_last_outcome_s"])),
        (
            "task latency p50 / p99",
            f"{millis(timings['latency_p50_ms'])} / {millis(timings['latency_p99_ms'])}",
        ),
        ("task latency max", millis(timings["latency_max_ms"])),
        (
            "overhead p50 / p99 (latency - work)",
            f"{millis(timings['overhead_p50_ms'])} / {millis(timings['overhead_p99_ms'])}",
        ),
        ("raw work-queue round trip p50", millis(timings["raw_work_queue_p50_ms"])),
        ("raw request-reply p50", millis(timings["raw_request_reply_p50_ms"])),
        (
            "throughput offered / achieved",
            f"{throughput['offered_per_s']:.1f} / {throughput['achieved_per_s'] or 0:.1f} per s",
        ),
    ]
    if "burst_per_s" in throughput:
        rows += [
            (
                f"after the chaos: durable, {BURST_IN_FLIGHT} in flight",
                f"{throughput['burst_per_s']:,.0f} per s",
            ),
            (
                f"raw work queue / raw request-reply, {BURST_IN_FLIGHT} in flight",
                f"{throughput['raw_work_queue_per_s']:,.0f} / "
                f"{throughput['raw_request_reply_per_s']:,.0f} per s",
            ),
            (
                "  durable vs raw work queue / raw request-reply",
                f"{throughput['burst_vs_raw_work_queue']:.0%} / "
                f"{throughput['burst_vs_raw_request_reply']:.0%}",
            ),
        ]
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)

    faults = Table(
        title="Faults (lateness bound: 2 heartbeats + claim timeout = "
        f"{timings['lateness_bound_s']:.1f} s)"
    )
    for column in ("#", "at", "kind", "victim", "down", "served again after", "caught up after"):
        faults.add_column(column, justify="left" if column in ("kind", "victim") else "right")
    faults.add_column("tasks/runs it hit first", justify="right")
    for n, row in enumerate(result["faults"], 1):
        caught = row["caught_up_s"]
        over = caught is not None and caught > timings["lateness_bound_s"]
        faults.add_row(
            str(n),
            seconds(row["at_s"]),
            row["kind"],
            row["victim"],
            seconds(row["down_s"]),
            seconds(row["served_again_s"]),
            ("[red]" if over or caught is None else "") + seconds(caught),
            str(row["hit"]),
        )
    console.print(faults)

    checks = Table(title="Checks")
    checks.add_column("check")
    checks.add_column("ok")
    checks.add_column("detail")
    for check in result["checks"]:
        checks.add_row(check["name"], "[green]yes" if check["ok"] else "[red]NO", check["detail"])
    console.print(checks)
    started = min((f["killed_at"] - f["at_s"] for f in result["faults"]), default=0.0)
    for row in result["slowest"]:
        console.print(
            f"slow: {row['task_id']} submitted at {row['submitted_at'] - started:.2f} s, "
            f"{row['latency_s']:.2f} s, attempt {row['attempts']} on {row['instance']}"
            + (f", errors: {', '.join(row['errors'])}" if row["errors"] else ""),
            highlight=False,
            markup=False,
        )
    for error in result["errors"]:
        console.print(f"- {error}", highlight=False, markup=False)
    console.print("[green]all checks hold" if result["ok"] else "[red]a check failed")
