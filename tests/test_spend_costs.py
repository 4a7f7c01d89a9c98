"""Costs: the price table, and dollars on every result, step, run and agent, as `chorus
usage` and `chorus runs show` print them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from chorus.agent import Agent
from chorus.agent.host import AgentHost
from chorus.cli.usage import since_of
from chorus.client.system import SystemClient
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.errors import ConfigError
from chorus.messages import RunRecord, Usage
from chorus.specs.agent import AgentSpec
from chorus.specs.workflow import Pipeline, Step
from chorus.spend.prices import PriceTable
from chorus.workflows.engine import Engine, new_record
from tests.cli import achorus
from tests.fake_openai import FakeOpenAI

PRICES = """\
models:
  gpt-priced: {input: 1000, cached_input: 100, output: 2000}
"""
# 4 words in (2 of them from the prompt cache), 4 out: 2 x 1000 + 2 x 100 + 4 x 2000 per 1e6
EXPECTED_USD = 0.0102


def test_the_shipped_table_prices_cached_input_and_dated_model_names() -> None:
    table = PriceTable.load()
    usage = Usage(input_tokens=1_000_000, output_tokens=100_000, cached_tokens=400_000)

    mini = table.priced("gpt-5-mini-2025-08-07", usage)

    # 600k input at $0.25/M + 400k cached at $0.025/M + 100k output at $2.00/M
    assert mini.usd == pytest.approx(0.15 + 0.01 + 0.2)
    assert table.cost("openai:gpt-5", usage) > table.cost("gpt-5-mini", usage)
    assert table.cost("offline", usage) == 0


def test_a_price_file_adds_and_replaces_models(tmp_path: Path) -> None:
    override = tmp_path / "prices.yaml"
    override.write_text(
        "models:\n  gpt-5: {input: 1, output: 1}\n  house-model: {input: 3, output: 3}\n"
    )

    table = PriceTable.load(override)

    usage = Usage(input_tokens=500_000, output_tokens=500_000)
    assert table.cost("gpt-5", usage) == pytest.approx(1.0)
    assert table.cost("house-model", usage) == pytest.approx(3.0)
    assert table.cost("gpt-5-mini", usage) > 0  # the shipped entries stay
    assert table.cost("nobody-prices-me", usage) == 0


def test_a_wrong_price_file_names_the_field(tmp_path: Path) -> None:
    override = tmp_path / "prices.yaml"
    override.write_text("models:\n  gpt-5: {input: 1, outptu: 1}\n")

    with pytest.raises(ConfigError, match="outptu"):
        PriceTable.load(override)


def test_since_reads_durations_and_dates() -> None:
    assert since_of("24h", now=100_000.0) == 100_000.0 - 86_400
    assert since_of("90m", now=10_000.0) == 10_000.0 - 5_400
    assert since_of("2026-12-01") == 1_796_083_200.0
    with pytest.raises(ConfigError, match="--since"):
        since_of("yesterday")


@pytest.fixture
async def priced_writer(
    openai_environ: FakeOpenAI, settings: Settings, tmp_path: Path
) -> AsyncIterator[AgentHost]:
    """An agent on `openai:gpt-priced`, with the price file as CHORUS_PRICES."""
    (tmp_path / "prices.yaml").write_text(PRICES)
    openai_environ.cached_tokens = 2
    tuned = msgspec.structs.replace(settings, prices=str(tmp_path / "prices.yaml"))
    spec = AgentSpec(name="writer", instructions="Write.", model="openai:gpt-priced")
    host = AgentHost(Agent(spec), tuned)
    await host.start()
    yield host
    await host.stop(timeout=5)


async def run_priced(engine: Engine) -> RunRecord:
    workflow = Pipeline(name="costed", steps=[Step(name="write", agent="writer")])
    return await engine.run(new_record(workflow, "three word input"))


async def test_costs_from_a_price_file_are_on_the_result_the_step_the_run_and_the_agent(
    priced_writer: AgentHost, engine: Engine
) -> None:
    record = await run_priced(engine)

    step = record.steps[0]
    usage = step.usage
    assert (usage.input_tokens, usage.cached_tokens, usage.output_tokens) == (4, 2, 4)
    assert step.usage.usd == pytest.approx(EXPECTED_USD)
    assert step.model == "gpt-priced"
    assert record.usage.usd == pytest.approx(EXPECTED_USD)
    assert record.by_model == {"gpt-priced": step.usage}
    assert priced_writer.heartbeat().usage.usd == pytest.approx(EXPECTED_USD)


async def test_chorus_usage_and_runs_show_print_the_spend(
    priced_writer: AgentHost, engine: Engine, coordinator: Coordinator, settings: Settings
) -> None:
    record = await run_priced(engine)
    registry = SystemClient(priced_writer.nc, settings.subjects)

    async def writer_has_spent() -> None:
        async for change in registry.watch_agents():
            if change.record is not None and change.record.usage.usd > 0:
                return

    await asyncio.wait_for(writer_has_spent(), 10)

    by_model = await achorus(settings, "usage")
    by_run = await achorus(settings, "usage", "--by", "run", "--since", "1h", "--json")
    by_agent = await achorus(settings, "usage", "--by", "agent")
    shown = await achorus(settings, "runs", "show", record.run_id)

    assert by_model.returncode == 0, by_model.stderr
    assert "gpt-priced" in by_model.stdout and "$0.0102" in by_model.stdout
    [row] = json.loads(by_run.stdout)
    assert row["run"] == record.run_id and row["usage"]["usd"] == pytest.approx(EXPECTED_USD)
    assert "writer" in by_agent.stdout and "$0.0102" in by_agent.stdout
    assert "8 tokens (4 in, 2 cached, 4 out), $0.0102" in shown.stdout
    assert "gpt-priced" in shown.stdout
