"""`chorus run` and `chorus runs` through the real entry point, against a real system.

The CLI runs as a child process; the coordinator, orchestrator and agents run in this one.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from nats.aio.client import Client

from chorus.agent import Agent, Context
from chorus.cli.runs import LiveProgress, PlainProgress
from chorus.client.runs import RunClient
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.messages import RunProgress, RunRecord, RunRequest, StepRecord, Task
from chorus.specs.workflow import Pipeline, Step, decode_workflow
from tests.cli import achorus, chorus, one_line_error
from tests.helpers import StartHost, StartOrchestrator

PIPELINE = """\
type: pipeline
name: chain
steps:
  - name: draft
    agent: worker
  - name: polish
    agent: worker
"""

FAILING = """\
type: pipeline
name: doomed
steps:
  - name: brew
    agent: broken
    retries: 0
"""


@pytest.fixture
async def system(
    coordinator: Coordinator, start_orchestrator: StartOrchestrator, start_host: StartHost
) -> None:
    """A coordinator, an orchestrator, a `worker` agent and a `broken` one that always raises."""
    broken = Agent(name="broken")

    @broken.on_task
    async def fail(task: Task, ctx: Context) -> str:
        raise RuntimeError("out of coffee")

    await start_host(Agent(name="worker", instructions="Work.", capabilities=["work"]))
    await start_host(broken)
    await start_orchestrator()


def workflow_file(tmp_path: Path, text: str, name: str = "flow") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


async def finished_run(nc: Client, settings: Settings, text: str, input: str) -> RunRecord:
    runs = RunClient(nc, settings.subjects)
    pending = await runs.submit(RunRequest(workflow=decode_workflow(text), input=input))
    return await runs.wait(pending.run_id, timeout=20)


@pytest.mark.usefixtures("system")
async def test_run_shows_each_step_and_prints_the_output(
    settings: Settings, tmp_path: Path
) -> None:
    result = await achorus(settings, "run", str(workflow_file(tmp_path, PIPELINE)), "what is NATS?")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for step in ("draft", "polish"):
        assert any("step_started" in line and f"{step}:" in line for line in lines), lines
        assert any("step_finished" in line and f"{step}:" in line for line in lines), lines
    assert "[offline] Work.: [offline] Work.: what is NATS?" in lines
    [summary] = [line for line in lines if line.startswith("completed run ")]
    assert "chain (pipeline) · 2/2 steps" in summary and "tokens" in summary


@pytest.mark.usefixtures("system")
async def test_run_reads_its_input_from_stdin(settings: Settings, tmp_path: Path) -> None:
    result = await achorus(
        settings, "run", str(workflow_file(tmp_path, PIPELINE)), "-", "--json", stdin="hi\n"
    )

    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["status"], record["input"]) == ("completed", "hi")
    assert record["output"] == "[offline] Work.: [offline] Work.: hi"
    assert "step_finished" in result.stderr  # progress goes to stderr beside --json


@pytest.mark.usefixtures("system")
async def test_failed_run_exits_1_and_shows_the_error(settings: Settings, tmp_path: Path) -> None:
    result = await achorus(settings, "run", str(workflow_file(tmp_path, FAILING)), "coffee?")

    assert result.returncode == 1, result.stderr
    assert any(
        "step_failed" in line and "brew:" in line and "out of coffee" in line
        for line in result.stdout.splitlines()
    ), result.stdout
    assert "failed run " in result.stdout
    assert "chorus: run failed:" in result.stderr and "out of coffee" in result.stderr


async def test_detached_run_prints_an_id_that_runs_show_reports(
    settings: Settings, tmp_path: Path
) -> None:
    detached = await achorus(
        settings, "run", str(workflow_file(tmp_path, PIPELINE)), "later", "--detach"
    )
    assert detached.returncode == 0, detached.stderr
    run_id = detached.stdout.strip()

    shown = await achorus(settings, "runs", "show", run_id, "--json")

    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert (record["run_id"], record["status"], record["input"]) == (run_id, "pending", "later")
    assert record["workflow"]["name"] == "chain"


async def test_workflow_with_a_wrong_field_is_one_line_and_nothing_is_sent(
    settings: Settings, nc: Client, tmp_path: Path
) -> None:
    wrong = workflow_file(tmp_path, PIPELINE.replace("    agent: worker\n", "    agnet: worker\n"))

    line = one_line_error(await achorus(settings, "run", str(wrong), "q"))

    assert "agnet" in line and "line 5" in line
    assert await RunClient(nc, settings.subjects).list() == []


async def test_run_without_an_orchestrator_says_to_start_one(
    settings: Settings, nc: Client, tmp_path: Path
) -> None:
    result = await achorus(
        settings, "run", str(workflow_file(tmp_path, PIPELINE)), "q", "--timeout", "0.5"
    )

    line = one_line_error(result)
    assert "still queued after 0.5s" in line and "chorus orchestrator" in line
    [queued] = await RunClient(nc, settings.subjects).list()
    assert queued.status == "pending" and queued.run_id in line


@pytest.mark.usefixtures("system")
async def test_runs_lists_recent_runs_with_status_and_steps(settings: Settings, nc: Client) -> None:
    record = await finished_run(nc, settings, PIPELINE, "q")

    table = await achorus(settings, "runs")
    as_json = await achorus(settings, "runs", "--json")

    assert table.returncode == 0, table.stderr
    [row] = [line for line in table.stdout.splitlines() if record.run_id[:12] in line]
    assert "chain" in row and "pipeline" in row and "completed" in row and "2/2" in row
    assert [r["run_id"] for r in json.loads(as_json.stdout)] == [record.run_id]


@pytest.mark.usefixtures("system")
async def test_runs_show_lists_steps_agents_and_output(settings: Settings, nc: Client) -> None:
    record = await finished_run(nc, settings, PIPELINE, "q")

    shown = await achorus(settings, "runs", "show", record.run_id[:8])

    assert shown.returncode == 0, shown.stderr
    draft = next(line for line in shown.stdout.splitlines() if "draft" in line)
    assert "completed" in draft and f"worker / {record.steps[0].instance}" in draft
    assert shown.stdout.rstrip().endswith(record.output)


def test_runs_show_of_an_unknown_id_is_one_line(settings: Settings) -> None:
    line = one_line_error(chorus(settings, "runs", "show", "feedface"))

    assert "no run 'feedface'" in line


async def test_runs_cancel_cancels_a_queued_run(settings: Settings, nc: Client) -> None:
    runs = RunClient(nc, settings.subjects)
    pending = await runs.submit(RunRequest(workflow=decode_workflow(PIPELINE), input="q"))

    result = await achorus(settings, "runs", "cancel", pending.run_id)

    assert result.returncode == 0, result.stderr
    assert f"run {pending.run_id} cancelled" in result.stdout
    assert (await runs.get(pending.run_id)).status == "cancelled"


def progress(kind: str, step: str = "", detail: str = "") -> RunProgress:
    return RunProgress(run_id="r1", kind=kind, workflow="chain", step=step, detail=detail)


def finished_record() -> RunRecord:
    workflow = Pipeline(name="chain", steps=[Step(name="a", agent="w"), Step(name="b", agent="w")])
    return RunRecord(
        run_id="r1",
        workflow=workflow,
        kind="pipeline",
        status="completed",
        steps=[
            StepRecord(name="a", status="completed", agent="w", duration_ms=5, ended_at=2.0),
            StepRecord(name="b", status="completed", agent="w", duration_ms=7, ended_at=3.0),
        ],
    )


def test_plain_progress_tells_the_ends_it_did_not_hear_of_from_the_record() -> None:
    out = io.StringIO()
    display = PlainProgress(out)

    display.show(progress("step_finished", "a", "w in 5 ms"))
    display.close(finished_record())

    lines = [line.split()[1:3] for line in out.getvalue().splitlines()]
    assert lines == [["step_finished", "a:"], ["step_finished", "b:"], ["run_completed"]]


def test_live_progress_draws_a_line_per_step_in_a_terminal() -> None:
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    display = LiveProgress(console, finished_record().workflow, "r1")

    display.show(progress("run_started", detail="pipeline"))
    display.show(progress("step_started", "a", "w, attempt 1"))
    display.show(progress("step_failed", "a", "out of coffee"))
    display.close(None)

    screen = out.getvalue()
    assert "chain" in screen and "0/2 steps" in screen
    assert "✗ a" in screen and "out of coffee" in screen


async def stored_runs(nc: Client, settings: Settings, now: float) -> None:
    """Runs as the orchestrator leaves them: chain completed 3 h ago, chain failed and
    brew completed 5 min ago."""
    store = await RunClient(nc, settings.subjects).store()
    for run_id, name, status, age_s in (
        ("old-chain", "chain", "completed", 3 * 3600),
        ("new-chain", "chain", "failed", 300),
        ("new-brew", "brew", "completed", 300),
    ):
        workflow = Pipeline(name=name, steps=[Step(name="a", agent="w")])
        await store.save(
            RunRecord(
                run_id=run_id,
                workflow=workflow,
                kind="pipeline",
                status=status,  # type: ignore[arg-type]
                created_at=now - age_s,
            )
        )


async def listed(settings: Settings, *filters: str) -> list[str]:
    result = await achorus(settings, "runs", "--json", *filters)
    assert result.returncode == 0, result.stderr
    return sorted(record["run_id"] for record in json.loads(result.stdout))


async def test_runs_lists_only_those_of_a_status_workflow_and_time(
    nc: Client, settings: Settings
) -> None:
    import time
    from datetime import UTC, datetime

    now = time.time()
    await stored_runs(nc, settings, now)
    an_hour_ago = datetime.fromtimestamp(now - 3600, UTC).isoformat().replace("+00:00", "Z")

    assert await listed(settings) == ["new-brew", "new-chain", "old-chain"]
    assert await listed(settings, "--status", "completed") == ["new-brew", "old-chain"]
    assert await listed(settings, "--status", "failed", "--status", "running") == ["new-chain"]
    assert await listed(settings, "--workflow", "chain") == ["new-chain", "old-chain"]
    assert await listed(settings, "--since", "1h") == ["new-brew", "new-chain"]
    assert await listed(settings, "--since", an_hour_ago) == ["new-brew", "new-chain"]
    assert await listed(
        settings, "--since", "1d", "--workflow", "chain", "--status", "completed"
    ) == ["old-chain"]
    assert await listed(settings, "--since", "1m") == []


async def test_runs_with_filters_that_match_nothing_says_so(nc: Client, settings: Settings) -> None:
    import time

    await stored_runs(nc, settings, time.time())

    result = await achorus(settings, "runs", "--workflow", "nope")

    assert result.returncode == 0, result.stderr
    assert "no runs match" in result.stdout


def test_runs_since_a_time_it_cannot_read_names_the_forms_it_takes(settings: Settings) -> None:
    result = chorus(settings, "runs", "--since", "yesterday")

    assert result.returncode == 2
    assert "'yesterday' is neither a duration (like 90s, 10m, 2h, 1d)" in result.stderr
