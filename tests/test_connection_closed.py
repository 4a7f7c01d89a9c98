"""A service whose NATS connection is closed for good exits non-zero, so it is restarted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from chorus.config import Settings
from chorus.errors import NatsUnreachable
from chorus.lifecycle import EXIT_NATS_CLOSED
from chorus.nats.connection import connect, redact_url
from chorus.nats.server import NatsServer
from tests.helpers import Reap, child_env

USERS = """
{limits}
authorization {{
  users = [
    {{user: operator, password: operator-secret}}
{extra}
  ]
}}
"""
COORDINATOR_USER = "    {user: coordinator, password: coordinator-secret}"


def write_users(path: Path, *, coordinator: bool = True, max_payload: int = 0) -> None:
    limits = f"max_payload: {max_payload}" if max_payload else ""
    path.write_text(USERS.format(extra=COORDINATOR_USER if coordinator else "", limits=limits))


async def wait_until_serving(settings: Settings, subject: str, timeout: float) -> None:
    """Ask `subject` until someone answers (the coordinator's metrics): it is then serving."""
    nc = await connect(settings, "test-operator")
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    await nc.request(subject, b"", timeout=0.5)
                    return
                except Exception:
                    await asyncio.sleep(0.1)  # not subscribed yet: ask again
    finally:
        await nc.close()


class CoordinatorUnderTest:
    """A `chorus coordinator` subprocess on a server of its own with password users."""

    def __init__(self, tmp_path: Path, settings: Settings, reap: Reap) -> None:
        self.users = tmp_path / "users.conf"
        write_users(self.users)
        self.server = NatsServer(tmp_path / "js", config_file=str(self.users))
        self.settings = settings
        self.log = tmp_path / "coordinator.log"
        self.reap = reap
        self.operator = Settings(
            nats_url="",
            prefix=settings.prefix,
            nats_user="operator",
            nats_password="operator-secret",
        )

    async def start(self) -> subprocess.Popen[bytes]:
        self.server.start()
        self.operator = msgspec.structs.replace(self.operator, nats_url=self.server.url)
        env = child_env(self.settings)
        env.update(
            {
                "NATS_URL": self.server.url,
                "NATS_USER": "coordinator",
                "NATS_PASSWORD": "coordinator-secret",
            }
        )
        with self.log.open("wb") as sink:
            process = self.reap(
                subprocess.Popen(
                    [sys.executable, "-m", "chorus", "coordinator"],
                    env=env,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            )
        await wait_until_serving(self.operator, self.settings.subjects.metrics, 20)
        return process

    def reload(self, **config: int | bool) -> None:
        write_users(self.users, **config)  # type: ignore[arg-type]
        assert self.server.pid is not None
        os.kill(self.server.pid, signal.SIGHUP)  # nats-server reloads its config

    async def exit_code(self, process: subprocess.Popen[bytes]) -> int:
        try:
            return await asyncio.to_thread(process.wait, 20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running:\n{self.log.read_text()}") from None

    def closed_lines(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if "closed for good" in line]


@pytest.fixture
def coordinator_under_test(
    tmp_path: Path, settings: Settings, reap: Reap
) -> Iterator[CoordinatorUnderTest]:
    under_test = CoordinatorUnderTest(tmp_path, settings, reap)
    yield under_test
    under_test.server.stop()


@pytest.mark.slow
async def test_service_exits_nonzero_when_nats_py_closes_its_connection(
    coordinator_under_test: CoordinatorUnderTest,
) -> None:
    process = await coordinator_under_test.start()
    # A smaller max_payload than the client learnt at connect: the coordinator's metrics
    # reply is refused with -ERR 'Maximum Payload Violation', and nats-py closes the client.
    coordinator_under_test.reload(max_payload=64)
    nc = await connect(coordinator_under_test.operator, "test-operator")
    with contextlib.suppress(Exception):  # the answer never comes
        await nc.request(coordinator_under_test.settings.subjects.metrics, b"", timeout=2)
    await nc.close()

    code = await coordinator_under_test.exit_code(process)

    assert code == EXIT_NATS_CLOSED
    [line] = coordinator_under_test.closed_lines()
    assert "maximum payload violation" in line.lower()
    assert "exiting so the supervisor restarts this process" in line


@pytest.mark.slow
async def test_service_exits_nonzero_when_the_server_drops_its_user(
    coordinator_under_test: CoordinatorUnderTest,
) -> None:
    process = await coordinator_under_test.start()
    # The server drops the connection; every reconnect is an authorization violation.
    coordinator_under_test.reload(coordinator=False)

    code = await coordinator_under_test.exit_code(process)

    assert code == EXIT_NATS_CLOSED
    [line] = coordinator_under_test.closed_lines()
    assert "refused this process's credentials" in line
    assert "exiting so the supervisor restarts this process" in line


def test_passwords_and_tokens_are_redacted_from_urls() -> None:
    url = "nats://alice:hunter2@a.example:4222, tls://s3cr3ttoken@b.example:4222,nats://c:4222"

    redacted = redact_url(url)

    assert redacted == "nats://alice:***@a.example:4222,tls://***@b.example:4222,nats://c:4222"


async def test_unreachable_error_does_not_show_the_password(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "js").start()
    url = f"nats://alice:hunter2@127.0.0.1:{server.port}"
    server.stop()  # the port is now closed

    with pytest.raises(NatsUnreachable) as raised:
        await connect(Settings(nats_url=url, connect_wait=0.3), "test")

    assert "hunter2" not in str(raised.value)
    assert "alice:***@127.0.0.1" in str(raised.value)
