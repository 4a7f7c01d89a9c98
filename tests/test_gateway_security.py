"""Who may use the gateway and what one request can cost it: API keys and scopes, Host and
Origin checks, JSON-only writes, body bounds, waiting limits and reads that survive bad data.

A real gateway on uvicorn and a real nats-server, through a real HTTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client

from chorus.agent import Agent
from chorus.client.runstore import KvRunStore
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.errors import ConfigError
from chorus.gateway import create_app
from chorus.gateway.keys import KEY_PREFIX, add_key, local_key, read_keys
from chorus.gateway.limits import MAX_JSON_DEPTH, too_deep
from chorus.gateway.options import GatewayOptions
from chorus.messages import RunRecord, encode
from chorus.specs.workflow import Pipeline, Step
from tests.coordination import wait_for_record
from tests.helpers import StartHost
from tests.test_gateway import PIPELINE, running

ROUTES = [
    ("POST", "/api/execute"),
    ("GET", "/api/runs"),
    ("GET", "/api/runs/some-run"),
    ("POST", "/api/runs/some-run/cancel"),
    ("GET", "/api/runs/some-run/stream"),
    ("GET", "/api/metrics"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
]


class Keys:
    """A keys file with one key per scope."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "gateway-keys.jsonl"
        self.read = add_key(self.path, "reader", ["read"])
        self.execute = add_key(self.path, "runner", ["execute"])
        self.admin = add_key(self.path, "ops", ["admin"])


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@contextlib.asynccontextmanager
async def gateway(
    nc: Client, settings: Settings, options: GatewayOptions
) -> AsyncIterator[httpx.AsyncClient]:
    stop = asyncio.Event()
    async with running(create_app(nc, settings, options, stopping=stop), stop) as client:
        yield client


@pytest.fixture
async def http(nc: Client, settings: Settings, keys: Keys) -> AsyncIterator[httpx.AsyncClient]:
    options = GatewayOptions.build("127.0.0.1", keys_file=str(keys.path))
    async with gateway(nc, settings, options) as client:
        yield client


async def execute(http: httpx.AsyncClient, key: str, body: object, **params: str) -> httpx.Response:
    return await http.post("/api/execute", json=body, params=params, headers=bearer(key))


# authentication and scopes


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_every_route_but_health_is_401_without_a_key(
    http: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await http.request(method, path, json={"workflow": PIPELINE})

    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert error["code"] == "unauthorized"
    assert "Authorization: Bearer" in error["reason"]


async def test_an_unknown_key_is_401(http: httpx.AsyncClient, keys: Keys) -> None:
    response = await http.get("/api/runs", headers=bearer(keys.read + "x"))

    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "unauthorized"


async def test_a_malformed_authorization_header_is_401(http: httpx.AsyncClient, keys: Keys) -> None:
    response = await http.get("/api/runs", headers={"Authorization": f"Basic {keys.read}"})

    assert response.status_code == 401


async def test_a_read_key_cannot_execute(http: httpx.AsyncClient, keys: Keys) -> None:
    response = await execute(http, keys.read, {"workflow": PIPELINE}, wait="false")

    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "forbidden"
    assert "`execute`" in error["reason"] and "'reader'" in error["reason"]


async def test_an_execute_key_cannot_read_runs(http: httpx.AsyncClient, keys: Keys) -> None:
    response = await http.get("/api/runs", headers=bearer(keys.execute))

    assert response.status_code == 403
    assert "`read`" in response.json()["error"]["reason"]


async def test_keys_with_the_scope_are_served(http: httpx.AsyncClient, keys: Keys) -> None:
    accepted = await execute(http, keys.execute, {"workflow": PIPELINE}, wait="false")
    link = accepted.headers["location"]

    read = await http.get(link, headers=bearer(keys.read))
    cancelled = await http.post(f"{link}/cancel", headers=bearer(keys.execute))
    listed = await http.get("/api/runs", headers=bearer(keys.admin))

    assert accepted.status_code == 202
    assert read.status_code == 200
    assert cancelled.status_code == 202
    assert [r["run_id"] for r in listed.json()["runs"]] == [accepted.json()["run_id"]]


async def test_health_is_open_but_lists_agents_only_to_keys_that_may_read(
    http: httpx.AsyncClient,
    keys: Keys,
    coordinator: Coordinator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
) -> None:
    host = await start_host(Agent(name="researcher", capabilities=["research"]))
    await wait_for_record(nc, settings, host.instance, lambda r: r is not None)

    anonymous = await http.get("/api/health")
    reader = await http.get("/api/health", headers=bearer(keys.read))
    runner = await http.get("/api/health", headers=bearer(keys.execute))

    assert anonymous.status_code == 200
    assert (anonymous.json()["healthy_agents"], anonymous.json()["agents"]) == (1, [])
    assert [a["instance"] for a in reader.json()["agents"]] == [host.instance]
    assert runner.json()["agents"] == []


async def test_health_with_a_wrong_key_is_401(http: httpx.AsyncClient) -> None:
    response = await http.get("/api/health", headers=bearer("chorus_wrong"))

    assert response.status_code == 401


async def test_the_access_log_names_the_key(
    http: httpx.AsyncClient, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="chorus.gateway"):
        await http.get("/api/runs", headers=bearer(keys.read))

    entry = next(r for r in caplog.records if r.msg == "request")
    assert entry.__dict__["api_key"] == "reader"


# keys on disk


def test_a_key_made_on_the_command_line_is_printed_once_and_stored_only_hashed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys.jsonl"

    add = ["gateway", "key", "add", "ci", "--scope", "read", "--scope", "execute"]

    made = subprocess.run(
        [sys.executable, "-m", "chorus", *add, "--keys", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith(KEY_PREFIX) and len(key) > 40
    text = path.read_text()
    assert key not in text and key.removeprefix(KEY_PREFIX) not in text
    (stored,) = read_keys(path)
    assert (stored.name, stored.scopes, stored.matches(key)) == ("ci", ["read", "execute"], True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_two_keys_never_share_a_salt(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    add_key(path, "a", ["read"])
    add_key(path, "b", ["read"])

    first, second = read_keys(path)

    assert first.salt != second.salt


def test_chorus_up_makes_its_key_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    keys_file, key_file = local_key(tmp_path / ".chorus")
    again = local_key(tmp_path / ".chorus")

    key = key_file.read_text().strip()
    assert again == (keys_file, key_file)
    assert key_file.read_text().strip() == key  # kept, not remade
    assert [k.matches(key) for k in read_keys(keys_file)] == [True]
    assert key not in keys_file.read_text()
    for path in (keys_file, key_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_empty_keys_file_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "keys.jsonl").write_text("")

    with pytest.raises(ConfigError, match="holds no keys"):
        GatewayOptions.build("127.0.0.1", keys_file=str(tmp_path / "keys.jsonl"))


def test_the_gateway_needs_keys_unless_told_otherwise() -> None:
    with pytest.raises(ConfigError, match="--keys FILE"):
        GatewayOptions.build("127.0.0.1")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "gateway.example"])
def test_no_auth_is_refused_off_loopback(host: str) -> None:
    with pytest.raises(ConfigError, match="--no-auth is refused") as refused:
        GatewayOptions.build(host, no_auth=True)
    assert "127.0.0.1" in refused.value.reason


def test_the_gateway_command_refuses_no_auth_on_every_interface() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_GATEWAY")}

    refused = subprocess.run(
        [sys.executable, "-m", "chorus", "gateway", "--host", "0.0.0.0", "--no-auth"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )

    assert refused.returncode == 2
    assert "--no-auth is refused on 0.0.0.0" in refused.stderr


# requests a web page could send


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
async def test_a_post_that_is_not_declared_json_is_415(
    http: httpx.AsyncClient, keys: Keys, content_type: str | None
) -> None:
    headers = bearer(keys.admin) | ({"Content-Type": content_type} if content_type else {})

    response = await http.post(
        "/api/execute", content=json.dumps({"workflow": PIPELINE}), headers=headers
    )

    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


async def test_a_form_post_to_cancel_is_415(http: httpx.AsyncClient, keys: Keys) -> None:
    response = await http.post(
        "/api/runs/some-run/cancel", data={"a": "b"}, headers=bearer(keys.admin)
    )

    assert response.status_code == 415


async def test_json_with_a_charset_is_json(http: httpx.AsyncClient, keys: Keys) -> None:
    response = await http.post(
        "/api/execute",
        params={"wait": "false"},
        content=json.dumps({"workflow": PIPELINE}),
        headers=bearer(keys.execute) | {"Content-Type": "application/json; charset=utf-8"},
    )

    assert response.status_code == 202


async def test_a_foreign_host_is_403_before_anything_else(http: httpx.AsyncClient) -> None:
    # What a DNS-rebinding page sends: its own name, resolved to this machine.
    response = await http.get("/api/health", headers={"Host": "attacker.example:8080"})

    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "forbidden"
    assert "--allowed-host" in error["reason"]


async def test_an_allowed_host_is_served(nc: Client, settings: Settings, keys: Keys) -> None:
    options = GatewayOptions.build(
        "127.0.0.1", keys_file=str(keys.path), allowed_hosts=["chorus.internal"]
    )
    async with gateway(nc, settings, options) as http:
        response = await http.get("/api/health", headers={"Host": "chorus.internal"})

    assert response.status_code == 200


async def test_a_foreign_origin_is_403(http: httpx.AsyncClient, keys: Keys) -> None:
    response = await http.post(
        "/api/execute",
        json={"workflow": PIPELINE},
        headers=bearer(keys.admin) | {"Origin": "https://attacker.example"},
    )

    assert response.status_code == 403
    assert "--allowed-origin" in response.json()["error"]["reason"]


async def test_the_gateways_own_origin_is_served(http: httpx.AsyncClient, keys: Keys) -> None:
    response = await http.get(
        "/api/runs", headers=bearer(keys.read) | {"Origin": str(http.base_url).rstrip("/")}
    )

    assert response.status_code == 200


@pytest.mark.parametrize(("path", "status"), [("/api/health", 200), ("/api/runs", 401)])
async def test_every_response_carries_the_security_headers(
    http: httpx.AsyncClient, path: str, status: int
) -> None:
    response = await http.get(path)

    assert response.status_code == status
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"


async def test_a_refused_host_carries_the_security_headers_too(http: httpx.AsyncClient) -> None:
    response = await http.get("/api/health", headers={"Host": "attacker.example"})

    assert response.headers["x-frame-options"] == "DENY"


# what one request can cost


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


async def test_deeply_nested_json_is_400_naming_the_limit_and_the_gateway_still_serves(
    http: httpx.AsyncClient, keys: Keys
) -> None:
    body = f'{{"workflow": {json.dumps(PIPELINE)}, "data": {nested(970)}}}'

    response = await http.post(
        "/api/execute",
        content=body,
        headers=bearer(keys.admin) | {"Content-Type": "application/json"},
    )
    listed = await http.get("/api/runs", headers=bearer(keys.read))

    assert response.status_code == 400
    assert f"more than {MAX_JSON_DEPTH} levels" in response.json()["error"]["reason"]
    assert listed.status_code == 200


def test_depth_is_measured_on_structure_not_on_brackets_in_strings() -> None:
    quoted = json.dumps({"input": "[" * 100 + '\\"{{{', "data": [[1, [2]], {"a": {}}]})

    assert not too_deep(quoted.encode(), 4)
    assert too_deep(quoted.encode(), 2)
    assert too_deep(nested(33).encode(), 32)
    assert not too_deep(nested(32).encode(), 32)
    assert not too_deep(b"[[[}}}", 2)  # not JSON: the decoder says so, not the depth check


async def test_a_long_run_id_is_400_naming_it_and_the_gateway_still_serves(
    http: httpx.AsyncClient, keys: Keys
) -> None:
    response = await execute(http, keys.admin, {"run_id": "r" * 5000, "workflow": PIPELINE})
    listed = await http.get("/api/runs", headers=bearer(keys.read))

    assert response.status_code == 400
    reason = response.json()["error"]["reason"]
    assert "run id" in reason and "the most is 128" in reason
    assert len(reason) < 200  # the id is not echoed back whole
    assert listed.status_code == 200


async def test_a_run_id_with_a_line_break_is_400(http: httpx.AsyncClient, keys: Keys) -> None:
    response = await execute(http, keys.admin, {"run_id": "run\n", "workflow": PIPELINE})

    assert response.status_code == 400


async def test_a_long_step_name_is_400_naming_the_field(
    http: httpx.AsyncClient, keys: Keys
) -> None:
    workflow = {**PIPELINE, "steps": [{"name": "s" * 200, "agent": "researcher"}]}

    response = await execute(http, keys.admin, {"workflow": workflow})

    assert response.status_code == 400
    assert "$.workflow.steps[0]" in response.json()["error"]["reason"]


async def test_a_run_too_large_for_nats_is_413_and_the_gateway_keeps_its_connection(
    http: httpx.AsyncClient, keys: Keys, nc: Client, settings: Settings
) -> None:
    # Under the body limit, but over the server's max_payload with its headers: published,
    # it would make nats-server close the gateway's connection (every route then 503).
    body = {"run_id": "r" * 128, "workflow": PIPELINE, "input": ""}
    size = nc.max_payload - 100
    body["input"] = "x" * (size - len(encode(body)))
    assert len(encode(body)) == size < settings.max_message_bytes

    response = await execute(http, keys.admin, body, wait="false")
    listed = await http.get("/api/runs", headers=bearer(keys.read))

    assert response.status_code == 413
    assert "max_payload" in response.json()["error"]["reason"]
    assert nc.is_connected
    assert listed.status_code == 200


async def test_waiting_executes_past_the_limit_are_429_with_retry_after(
    nc: Client, settings: Settings, keys: Keys
) -> None:
    options = replace(GatewayOptions.build("127.0.0.1", keys_file=str(keys.path)), max_waiting=1)
    submitted = await nc.subscribe(settings.subjects.run_submit(), max_msgs=1)
    stop = asyncio.Event()
    async with running(create_app(nc, settings, options, stopping=stop), stop) as http:
        # No orchestrator runs: the first request waits until the gateway stops.
        first = asyncio.create_task(execute(http, keys.admin, {"workflow": PIPELINE}))
        await submitted.next_msg(timeout=5)

        second = await execute(http, keys.admin, {"workflow": PIPELINE})
        not_waiting = await execute(http, keys.admin, {"workflow": PIPELINE}, wait="false")
        listed = await http.get("/api/runs", headers=bearer(keys.read))
        stop.set()
        await asyncio.wait_for(first, 5)

    assert second.status_code == 429
    assert second.headers["retry-after"].isdigit()
    assert "wait=false" in second.json()["error"]["reason"]
    assert not_waiting.status_code == 202
    # the refused request left no run behind
    assert len(listed.json()["runs"]) == 2


# reads that survive bad data


async def test_junk_in_the_runs_bucket_does_not_break_the_run_list(
    http: httpx.AsyncClient,
    keys: Keys,
    nc: Client,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = await execute(http, keys.admin, {"workflow": PIPELINE}, wait="false")
    runs = (await KvRunStore.open(nc.jetstream(), settings.subjects)).kv
    await runs.put("junk", b"not a run record")
    workflow = Pipeline(name="deep", steps=[Step(agent="researcher")])
    deep = encode(RunRecord(run_id="deep", workflow=workflow, kind="pipeline"))
    await runs.put("deep", deep.replace(b'"data":null', b'"data":' + nested(5000).encode()))

    with caplog.at_level(logging.WARNING, logger="chorus.client.runstore"):
        response = await http.get("/api/runs", headers=bearer(keys.read))

    assert response.status_code == 200
    assert [r["run_id"] for r in response.json()["runs"]] == [good.json()["run_id"]]
    skipped = {r.__dict__["key"] for r in caplog.records if r.msg == "skipping an unreadable run"}
    assert skipped == {"junk", "deep"}
