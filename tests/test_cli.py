"""The `chorus` command through its real entry point, against a real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from nats.aio.client import Client

from chorus.agent import Agent
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.messages import Event, decode
from tests.cli import achorus, chorus, one_line_error
from tests.coordination import wait_for_record
from tests.helpers import ROOT, StartHost, child_env, write_spec


async def test_pub_then_tail_shows_the_decoded_event(settings: Settings) -> None:
    subject = settings.subjects.event("findings.new")
    tail = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chorus",
        "tail",
        settings.subjects.all_events,
        "--json",
        "--count",
        "1",
        env=child_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert tail.stderr and tail.stdout
    try:
        ready = await asyncio.wait_for(tail.stderr.readline(), 20)
        assert b"following" in ready

        published = await achorus(settings, "pub", subject, '{"claim": "NATS is fast"}')

        assert published.returncode == 0, published.stderr
        assert "stored event" in published.stdout
        line = json.loads(await asyncio.wait_for(tail.stdout.readline(), 20))
        assert await asyncio.wait_for(tail.wait(), 20) == 0
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()
    assert line["subject"] == subject
    assert line["type"] == "event"
    assert line["data"]["topic"] == "findings.new"
    assert line["data"]["data"] == {"claim": "NATS is fast"}


async def test_pub_stores_events_for_later_replay(settings: Settings, nc: Client) -> None:
    subject = settings.subjects.event("orders.created")
    assert (await achorus(settings, "pub", subject, '{"order": 7}')).returncode == 0

    replay = await achorus(
        settings, "tail", settings.subjects.all_events, "--history", "--json", "--count", "1"
    )

    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout)["data"]["data"] == {"order": 7}


async def test_req_to_a_capability_prints_the_result(
    start_host: StartHost, settings: Settings
) -> None:
    await start_host(Agent(name="researcher", instructions="Research.", capabilities=["research"]))

    result = await achorus(
        settings, "req", settings.subjects.capability_task("research"), '{"input": "what is NATS?"}'
    )

    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["type"] == "result"
    assert reply["output"] == "[offline] Research.: what is NATS?"


async def test_req_with_a_wrong_field_names_it_before_sending(settings: Settings) -> None:
    result = await achorus(
        settings, "req", settings.subjects.capability_task("research"), '{"input": 5}'
    )

    line = one_line_error(result)
    assert "$.input" in line and "Expected `str`, got `int`" in line


async def test_agents_lists_instances_from_the_registry(
    coordinator: Coordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    host = await start_host(Agent(name="researcher", capabilities=["research"], max_concurrency=3))
    await wait_for_record(nc, settings, host.instance, lambda r: r is not None)

    as_json = await achorus(settings, "agents", "--json")
    as_table = await achorus(settings, "agents", "--once")

    assert as_json.returncode == 0, as_json.stderr
    [entry] = json.loads(as_json.stdout)
    assert entry["instance"] == host.instance
    assert (entry["health"], entry["max_concurrency"]) == ("healthy", 3)
    assert host.instance in as_table.stdout and "healthy" in as_table.stdout
    assert "0/3" in as_table.stdout


def test_unreachable_server_is_one_readable_line(settings: Settings) -> None:
    result = chorus(settings, "--nats-url", "nats://127.0.0.1:1", "agents")

    line = one_line_error(result)
    assert "cannot reach NATS at nats://127.0.0.1:1" in line
    assert "chorus up" in line


def test_missing_payload_file_is_one_readable_line(settings: Settings) -> None:
    line = one_line_error(chorus(settings, "pub", "x.y", "@/no/such/file.json"))

    assert "cannot read /no/such/file.json" in line


def test_bad_json_event_is_one_readable_line(settings: Settings) -> None:
    line = one_line_error(chorus(settings, "pub", settings.subjects.event("x"), "{bad"))

    assert "event data is not JSON" in line


def test_missing_spec_file_is_one_readable_line(settings: Settings) -> None:
    line = one_line_error(chorus(settings, "agent", "run", "no-such-agent.yaml"))

    assert "no-such-agent.yaml does not exist" in line


def test_spec_with_unknown_field_names_field_and_line(settings: Settings, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "bad", "name: bad\ncapabilities: [x]\nmax_concurency: 3\n")

    line = one_line_error(chorus(settings, "agent", "run", str(spec)))

    assert "max_concurency" in line and "line 3" in line


def test_openai_agent_without_api_key_fails_at_start(settings: Settings, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "real", "name: real\nmodel: openai:gpt-5-mini\n")
    env = child_env(settings)
    env.pop("OPENAI_API_KEY", None)

    result = subprocess.run(
        [sys.executable, "-m", "chorus", "agent", "run", str(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    line = one_line_error(result)
    assert "OPENAI_API_KEY is not set" in line


def test_schema_prints_every_message_type(settings: Settings) -> None:
    result = chorus(settings, "schema")

    schema = json.loads(result.stdout)
    assert {
        "Task",
        "Result",
        "ErrorReply",
        "Event",
        "Heartbeat",
        "HelpRequest",
        "HelpReply",
        "AgentInfo",
    } <= set(schema["$defs"])
    assert decode(b'{"topic": "x"}', Event).topic == "x"


def test_refused_credentials_are_one_line_even_for_a_service(tmp_path: Path) -> None:
    from chorus.nats.server import NatsServer

    config = tmp_path / "auth.conf"
    config.write_text('authorization { user: "agent", password: "right" }\n')
    server = NatsServer(tmp_path / "js", config_file=str(config)).start()
    try:
        env = {
            **child_env(Settings(nats_url=server.url)),
            "NATS_USER": "agent",
            "NATS_PASSWORD": "wrong",
        }
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "chorus",
                "agent",
                "run",
                str(ROOT / "shared/chorus/examples/agents/researcher.yaml"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.stop()

    assert result.returncode == 2
    assert "refused agent: check NATS_USER and NATS_PASSWORD" in result.stderr.splitlines()[-1]


def test_a_service_gives_up_on_unreachable_nats_after_its_connect_wait(settings: Settings) -> None:
    env = {**child_env(settings), "NATS_URL": "nats://127.0.0.1:1", "CHORUS_CONNECT_WAIT": "1"}

    result = subprocess.run(
        [sys.executable, "-m", "chorus", "coordinator"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "cannot reach NATS at nats://127.0.0.1:1" in result.stderr.splitlines()[-1]
