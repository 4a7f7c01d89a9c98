"""`chorus state` through the real entry point, against a real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from nats.aio.client import Client

from chorus.config import Settings
from chorus.state import SharedState
from tests.cli import achorus as arun_chorus
from tests.cli import chorus as run_chorus
from tests.helpers import child_env


def chorus(
    settings: Settings, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return run_chorus(settings, "state", *args, stdin=stdin)


async def achorus(
    settings: Settings, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return await arun_chorus(settings, "state", *args, stdin=stdin)


def succeeded(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_put_then_get_returns_the_json_value_and_who_wrote_it(settings: Settings) -> None:
    stored = succeeded(await achorus(settings, "put", "orders.7", '{"qty": 2, "sku": "tea"}'))

    got = json.loads(succeeded(await achorus(settings, "get", "orders.7", "--json")))
    plain = succeeded(await achorus(settings, "get", "orders.7"))

    assert stored.startswith("stored orders.7 at revision ")
    assert got["value"] == {"qty": 2, "sku": "tea"}
    assert got["writer"].startswith("cli-") and got["operation"] == "put"
    assert json.loads(plain) == {"qty": 2, "sku": "tea"}


async def test_put_of_text_that_is_not_json_stores_a_string(settings: Settings, nc: Client) -> None:
    succeeded(await achorus(settings, "put", "greeting", "hello there"))

    state = await SharedState(nc, settings.subjects, "test").open()
    found = await state.get("greeting")

    assert found is not None and found.value == "hello there"
    assert succeeded(await achorus(settings, "get", "greeting")) == "hello there\n"


async def test_put_reads_the_value_from_a_file_or_stdin(
    settings: Settings, nc: Client, tmp_path: Path
) -> None:
    source = tmp_path / "config.json"
    source.write_text('{"retries": 3}\n')

    succeeded(await achorus(settings, "put", "config", f"@{source}"))
    succeeded(await achorus(settings, "put", "counter", "-", stdin="42\n"))

    state = await SharedState(nc, settings.subjects, "test").open()
    config, counter = await state.get("config"), await state.get("counter")
    assert config is not None and config.value == {"retries": 3}
    assert counter is not None and counter.value == 42


async def test_history_lists_every_revision_and_the_delete(settings: Settings) -> None:
    succeeded(await achorus(settings, "put", "phase", "draft"))
    succeeded(await achorus(settings, "put", "phase", "review"))
    assert succeeded(await achorus(settings, "delete", "phase")) == "deleted phase\n"

    history = json.loads(succeeded(await achorus(settings, "history", "phase", "--json")))
    table = succeeded(await achorus(settings, "history", "phase"))

    assert [(h["operation"], h["value"]) for h in history] == [
        ("put", "draft"),
        ("put", "review"),
        ("delete", None),
    ]
    assert "review" in table and "delete" in table


async def test_get_of_a_deleted_key_exits_1_saying_it_has_no_value(settings: Settings) -> None:
    succeeded(await achorus(settings, "put", "temp", "1"))
    succeeded(await achorus(settings, "delete", "temp"))

    result = await achorus(settings, "get", "temp")

    assert result.returncode == 1
    assert (result.stdout, result.stderr) == ("", "chorus: key 'temp' has no value\n")


def test_invalid_key_is_one_line_naming_it(settings: Settings) -> None:
    result = chorus(settings, "put", "bad key:", "1")

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("chorus: error: key 'bad key:' is not a valid key")


async def test_watch_prints_another_writers_put(settings: Settings, nc: Client) -> None:
    watch = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chorus",
        "state",
        "watch",
        "orders.>",
        "--count",
        "1",
        "--json",
        env=child_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert watch.stdout and watch.stderr
    ready = await asyncio.wait_for(watch.stderr.readline(), 20)
    assert ready.startswith(b"watching orders.>")

    state = await SharedState(nc, settings.subjects, "agent-7").open()
    await state.put("elsewhere", "not watched")
    revision = await state.put("orders.9", {"qty": 1})

    change = json.loads(await asyncio.wait_for(watch.stdout.readline(), 20))
    code = await asyncio.wait_for(watch.wait(), 20)
    assert code == 0, await watch.stderr.read()
    assert change["key"] == "orders.9" and change["value"] == {"qty": 1}
    assert (change["writer"], change["revision"]) == ("agent-7", revision)


async def test_ls_lists_the_keys_with_a_value_under_a_prefix(
    settings: Settings, nc: Client
) -> None:
    state = await SharedState(nc, settings.subjects, "test").open()
    for key in ("orders", "orders.7", "orders.8.lines", "orders2", "users.ada"):
        await state.put(key, {"k": key})
    await state.delete("orders.8.lines")
    async with state.lock("orders-batch"):
        under_orders = succeeded(await achorus(settings, "ls", "orders"))
        everything = json.loads(succeeded(await achorus(settings, "ls", "--json")))
        locks = succeeded(await achorus(settings, "ls", "_lock"))
    await state.close()

    assert under_orders.splitlines() == ["orders", "orders.7"]
    assert everything == ["orders", "orders.7", "orders2", "users.ada"]
    assert locks.splitlines() == ["_lock.orders-batch"]


async def test_ls_of_an_empty_prefix_says_so_and_succeeds(settings: Settings) -> None:
    result = await achorus(settings, "ls", "nothing.here")

    assert (result.returncode, result.stdout) == (0, "")
    assert "no keys under 'nothing.here'" in result.stderr


def test_ls_of_an_invalid_prefix_names_it(settings: Settings) -> None:
    result = chorus(settings, "ls", "orders..7")

    assert result.returncode == 2
    assert "prefix 'orders..7' is not a valid key" in result.stderr


async def test_history_shows_each_time_in_iso_8601_utc_with_milliseconds(
    settings: Settings, nc: Client
) -> None:
    from datetime import UTC, datetime

    state = await SharedState(nc, settings.subjects, "test").open()
    await state.put("orders.9", {"qty": 1})
    [stored] = await state.history("orders.9")
    await state.close()

    table = succeeded(await achorus(settings, "history", "orders.9"))

    expected = datetime.fromtimestamp(stored.time, UTC).isoformat(timespec="milliseconds")
    assert expected.replace("+00:00", "Z") in table
