"""`chorus up` on a port something else listens on: said at once, with what to do."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from chorus.config import Settings
from chorus.errors import ConfigError
from chorus.nats.server import NatsServer
from tests.cli import chorus, one_line_error


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_up_on_a_busy_port_names_it_and_what_to_do(
    settings: Settings, busy_port: int, tmp_path: Path
) -> None:
    result = chorus(settings, "up", "--data-dir", str(tmp_path / "data"), "--port", str(busy_port))

    line = one_line_error(result)
    assert f"port {busy_port} is in use" in line
    assert "--port" in line and "stop that server" in line
    assert "JETSTREAM" not in result.stdout + result.stderr  # no server banner
    assert not (tmp_path / "data" / "jetstream").exists()  # no server was started


def test_a_port_taken_that_only_the_server_finds_is_named_from_its_output(
    busy_port: int, tmp_path: Path
) -> None:
    # The client port is free; the monitoring port is not: only nats-server's own
    # "address already in use" tells.
    server = NatsServer(tmp_path / "js", monitor_port=busy_port)

    with pytest.raises(ConfigError, match=f"port {busy_port} is in use"):
        server.start()

    assert server.pid is None  # stopped, not left running
