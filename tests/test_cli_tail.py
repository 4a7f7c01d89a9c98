"""`chorus tail --history` and `--replies` through the real entry point, on a real server."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from datetime import UTC, datetime

from nats.aio.client import Client
from nats.js.api import StorageType, StreamConfig

from chorus.client import ChorusClient
from chorus.config import Settings
from chorus.messages import Event, Result, RunProgress, StreamChunk, TaskOutcome, encode
from chorus.nats.streams import ensure_chunk_stream, ensure_events_stream, ensure_tasks_bucket
from chorus.workflows.progress import NatsProgress
from tests.cli import achorus
from tests.helpers import child_env

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def stored_times(nc: Client, stream: str) -> list[str]:
    """When `stream` stored each of its messages, as the CLI prints times."""
    js = nc.jetstream()
    last = (await js.stream_info(stream)).state.last_seq
    times = []
    for seq in range(1, last + 1):
        stored = (await js.get_msg(stream, seq)).time
        assert stored is not None
        times.append(stored.astimezone(UTC).isoformat(timespec="milliseconds"))
    return [t.replace("+00:00", "Z") for t in times]


async def test_history_replays_every_stream_the_pattern_covers_oldest_first_with_stored_times(
    nc: Client, settings: Settings
) -> None:
    subjects = settings.subjects
    js = nc.jetstream()
    await ensure_events_stream(js, subjects)
    await ensure_chunk_stream(js, subjects, 3600)
    client = ChorusClient(nc, subjects)
    await client.publish_event(Event(topic="orders.created", data={"order": 1}))
    chunk = StreamChunk(run_id="r1", task_id="draft", attempt=1, seq=1, kind="final", text="hi")
    await js.publish(subjects.task_stream("r1", "draft", 1), encode(chunk))
    await client.publish_event(Event(topic="orders.paid", data={"order": 1}))

    result = await achorus(settings, "tail", "--history", "--json", "--count", "3")

    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["subject"] for line in lines] == [
        subjects.event("orders.created"),
        subjects.task_stream("r1", "draft", 1),
        subjects.event("orders.paid"),
    ]
    events = await stored_times(nc, subjects.events_stream)
    [chunk_time] = await stored_times(nc, subjects.chunk_stream)
    assert [line["time"] for line in lines] == [events[0], chunk_time, events[1]]
    assert all(ISO_MS.match(line["time"]) for line in lines)


async def test_history_stops_after_count_messages(nc: Client, settings: Settings) -> None:
    client = ChorusClient(nc, settings.subjects)
    for order in range(3):
        await client.publish_event(Event(topic="orders.created", data={"order": order}))

    result = await achorus(
        settings, "tail", settings.subjects.all_events, "--history", "--json", "--count", "2"
    )

    assert result.returncode == 0, result.stderr
    orders = [json.loads(line)["data"]["data"]["order"] for line in result.stdout.splitlines()]
    assert orders == [0, 1]


async def test_history_finds_a_stream_past_the_first_page_of_the_server_s_list(
    nc: Client, settings: Settings
) -> None:
    # The server lists streams 256 to a page, by name: 300 that sort first push ours past it.
    js = nc.jetstream()
    pad = f"AAA_{settings.prefix}"
    for i in range(300):
        await js.add_stream(
            StreamConfig(
                name=f"{pad}_{i:03}",
                subjects=[f"{pad}.{i}"],
                storage=StorageType.MEMORY,
            )
        )
    try:
        client = ChorusClient(nc, settings.subjects)
        await client.publish_event(Event(topic="orders.created", data={"order": 7}))

        result = await achorus(
            settings, "tail", settings.subjects.all_events, "--history", "--json", "--count", "1"
        )
    finally:
        for i in range(300):
            await js.delete_stream(f"{pad}_{i:03}")

    assert result.returncode == 0, result.stderr
    [line] = [json.loads(line) for line in result.stdout.splitlines()]
    assert line["data"]["data"] == {"order": 7}


async def test_run_progress_prints_as_a_readable_line(nc: Client, settings: Settings) -> None:
    tail = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chorus",
        "tail",
        settings.subjects.all_runs,
        "--count",
        "1",
        env=child_env(settings) | {"COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert tail.stdout and tail.stderr
    try:
        assert b"following" in await asyncio.wait_for(tail.stderr.readline(), 20)
        await NatsProgress(nc, settings.subjects).publish(
            RunProgress(
                run_id="r1", kind="step_finished", workflow="chain", step="draft", detail="w 5 ms"
            )
        )
        line = (await asyncio.wait_for(tail.stdout.readline(), 20)).decode()
        assert await asyncio.wait_for(tail.wait(), 20) == 0
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()
    assert "run_progress run=r1 step_finished chain/draft w 5 ms" in line
    assert "{" not in line
    assert ISO_MS.match(line.split()[0])


async def test_replies_shows_the_recorded_outcomes_of_durable_tasks(
    nc: Client, settings: Settings
) -> None:
    tasks = await ensure_tasks_bucket(nc.jetstream(), settings.subjects)
    result = Result(task_id="t-7", agent="worker", instance="worker-a1", output="done well")
    outcome = TaskOutcome(task_id="t-7", status="completed", result=result, attempts=2)
    await tasks.put(settings.subjects.outcome_key("t-7"), encode(outcome))

    replay = await achorus(settings, "tail", "--replies", "--history", "--count", "1")

    assert replay.returncode == 0, replay.stderr
    assert "task_outcome" in replay.stdout
    assert "completed task t-7 after 2 attempts: done well" in replay.stdout
    shown_at = replay.stdout.split()[0]
    assert ISO_MS.match(shown_at)
    assert abs(datetime.fromisoformat(shown_at).timestamp() - outcome.time) < 5
