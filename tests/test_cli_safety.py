"""The CLI shows what others wrote (heartbeats, runs) as text: no terminal escapes, no markup."""

from __future__ import annotations

import json

from nats.aio.client import Client

from chorus.client.runs import RunClient
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.messages import AgentRecord, RunRecord, encode
from chorus.nats.streams import ensure_agents_bucket
from chorus.specs.workflow import Pipeline, Step
from tests.cli import achorus

ESCAPE = "\x1b]0;pwned\x07\x1b[2J"  # retitle the window, clear the screen
MARKUP = "[blink]boo[/blink]"


def forged_record(instance: str) -> AgentRecord:
    return AgentRecord(
        instance=instance,
        name=f"ev{ESCAPE}il",
        capabilities=[MARKUP],
        health="healthy",
        state="ready",
        in_flight=0,
        max_concurrency=1,
        processed=0,
        failed=0,
        success_rate=1.0,
        mean_latency_ms=0.0,
        last_seen=0.0,
        started_at=0.0,
    )


async def test_agents_table_shows_escapes_and_markup_from_the_registry_as_text(
    nc: Client, settings: Settings
) -> None:
    agents = await ensure_agents_bucket(nc.jetstream(), settings.subjects)
    await agents.put("evil-1", encode(forged_record("evil-1")))

    result = await achorus(settings, "agents", "--once")

    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "ev\\x1b]0;pwned\\x07" in result.stdout
    assert MARKUP in result.stdout


async def test_runs_show_shows_escapes_and_markup_from_run_input_as_text(
    nc: Client, settings: Settings
) -> None:
    workflow = Pipeline(name="wf", steps=[Step(name="s", agent="a", instructions="i")])
    record = RunRecord(
        run_id="forged-run", workflow=workflow, kind="pipeline", input=f"hi{ESCAPE}{MARKUP}"
    )
    await (await RunClient(nc, settings.subjects).store()).save(record)

    result = await achorus(settings, "runs", "show", "forged-run")

    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "hi\\x1b]0;pwned" in result.stdout
    assert MARKUP in result.stdout


async def test_req_coordinator_metrics_answers_with_the_metrics(
    coordinator: Coordinator, settings: Settings
) -> None:
    result = await achorus(settings, "req", settings.subjects.metrics)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["type"] == "metrics"
