"""A stored run record that does not decode is a clear error for that run, never a crash."""

from __future__ import annotations

import pytest
from nats.aio.client import Client

from chorus.client.runs import RunClient
from chorus.client.runstore import KvRunStore
from chorus.config import Settings
from chorus.errors import UnreadableRecord
from tests.cli import achorus, one_line_error
from tests.test_gateway import running_gateway

GARBAGE = b"\x00not a run record"
DEEP = b'{"type": "run_record", "run_id": "r", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


async def store_raw(nc: Client, settings: Settings, run_id: str, value: bytes) -> None:
    store = await KvRunStore.open(nc.jetstream(), settings.subjects)
    await store.kv.put(run_id, value)


@pytest.mark.parametrize("value", [GARBAGE, DEEP], ids=["garbage", "nested-too-deep"])
async def test_getting_an_undecodable_run_names_the_run_and_the_problem(
    nc: Client, settings: Settings, value: bytes
) -> None:
    await store_raw(nc, settings, "bad-run", value)

    with pytest.raises(UnreadableRecord) as raised:
        await RunClient(nc, settings.subjects).get("bad-run")

    assert "run 'bad-run' is stored but cannot be read" in raised.value.reason


async def test_gateway_answers_an_undecodable_run_with_a_json_error(
    nc: Client, settings: Settings
) -> None:
    await store_raw(nc, settings, "bad-run", DEEP)

    async with running_gateway(nc, settings) as http:
        response = await http.get("/api/runs/bad-run")

    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "unreadable_record"
    assert "bad-run" in error["reason"] and "nested too deeply" in error["reason"]


async def test_runs_show_of_an_undecodable_run_is_one_error_line(
    nc: Client, settings: Settings
) -> None:
    await store_raw(nc, settings, "bad-run", GARBAGE)

    result = await achorus(settings, "runs", "show", "bad-run")

    line = one_line_error(result)
    assert "run 'bad-run' is stored but cannot be read" in line


async def test_runs_list_still_shows_the_readable_runs_beside_a_bad_one(
    nc: Client, settings: Settings
) -> None:
    await store_raw(nc, settings, "bad-run", GARBAGE)

    result = await achorus(settings, "runs")

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
