"""MCP tool sources against real MCP servers (tests/mcp_server.py) over stdio and HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from chorus.agent import Agent
from chorus.client import ChorusClient
from chorus.errors import ConfigError, ToolFailed
from chorus.messages import Task
from chorus.specs.agent import load_spec
from chorus.tools.base import ToolCallContext
from chorus.tools.mcp import McpSource, McpTool
from tests.helpers import ROOT, StartHost, write_spec

CTX = ToolCallContext(agent="tester", instance="tester-1")


def stdio_config(count_file: Path, **extra: object) -> dict[str, object]:
    return {
        "name": "test",
        "command": sys.executable,
        "args": ["-m", "tests.mcp_server", "stdio", "--count-file", str(count_file)],
        "cwd": str(ROOT),
        "ping_interval_s": 0.5,
        "restart_backoff_s": 0.1,
        **extra,
    }


def by_name(tools: object) -> dict[str, McpTool]:
    assert isinstance(tools, list)
    return {tool.definition.name: tool for tool in tools}


@pytest.fixture
async def stdio_source(tmp_path: Path) -> AsyncIterator[tuple[McpSource, dict[str, McpTool]]]:
    source = McpSource(stdio_config(tmp_path / "count", prefix="calc"))
    tools = by_name(await source.start())
    yield source, tools
    await source.close()


def gone(pid: int) -> bool:
    """No such process, not even a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_tools_are_listed_with_the_prefix_and_their_schemas(
    stdio_source: tuple[McpSource, dict[str, McpTool]],
) -> None:
    _, tools = stdio_source

    assert set(tools) == {"calc_add", "calc_echo", "calc_fail", "calc_count", "calc_pid"}
    add = tools["calc_add"].definition
    assert add.description == "Add two integers."
    assert add.parameters["properties"]["a"]["type"] == "integer"
    assert add.parameters["required"] == ["a", "b"]


async def test_a_call_returns_the_tools_result(
    stdio_source: tuple[McpSource, dict[str, McpTool]],
) -> None:
    _, tools = stdio_source

    assert await tools["calc_add"].call({"a": 2, "b": 3}, CTX) == "5"
    assert await tools["calc_echo"].call({"text": "hello"}, CTX) == "hello"


async def test_an_error_result_is_a_tool_failure_with_the_servers_text(
    stdio_source: tuple[McpSource, dict[str, McpTool]],
) -> None:
    _, tools = stdio_source

    with pytest.raises(ToolFailed, match="the fail tool always fails"):
        await tools["calc_fail"].call({}, CTX)


async def test_a_prefix_that_makes_a_name_too_long_is_refused_clearly(tmp_path: Path) -> None:
    source = McpSource(stdio_config(tmp_path / "count", prefix="p" * 60))

    with pytest.raises(ConfigError, match="not a valid tool name"):
        await source.start()


async def test_a_config_with_both_command_and_url_is_refused() -> None:
    with pytest.raises(ConfigError, match="exactly one of `command`"):
        McpSource({"command": "x", "url": "http://127.0.0.1:1/mcp"})


async def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    source = McpSource({"name": "broken", "command": str(tmp_path / "no-such-server")})

    with pytest.raises(ConfigError, match="MCP server 'broken' did not start"):
        await source.start()


async def test_killed_stdio_server_fails_calls_clearly_then_is_restarted(tmp_path: Path) -> None:
    count_file = tmp_path / "count"
    source = McpSource(stdio_config(count_file))
    tools = by_name(await source.start())
    try:
        first_pid = int(await tools["pid"].call({}, CTX))
        assert await tools["count"].call({}, CTX) == "1"

        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(ToolFailed, match="MCP server test is restarting; try again"):
            await tools["count"].call({}, CTX)
        await source.wait_up(timeout=30)

        assert await tools["count"].call({}, CTX) == "2"  # the failed call never ran
        assert int(await tools["pid"].call({}, CTX)) != first_pid
        assert source.restarts == 1
        assert gone(first_pid)
    finally:
        await source.close()


async def test_close_leaves_no_server_process(tmp_path: Path) -> None:
    source = McpSource(stdio_config(tmp_path / "count"))
    tools = by_name(await source.start())
    pid = int(await tools["pid"].call({}, CTX))

    await source.close()

    assert gone(pid)
    with pytest.raises(ToolFailed, match="restarting"):
        await tools["echo"].call({"text": "late"}, CTX)


# --- streamable HTTP -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Connect until the server accepts (the deadline bounds it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        assert process.poll() is None, "the MCP HTTP server exited"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                raise AssertionError(f"MCP HTTP server not listening on {port}") from None
            await asyncio.sleep(0.05)  # the deadline-bounded port poll
            continue
        writer.close()
        await writer.wait_closed()
        return


class HttpServer:
    def __init__(self, port: int, count_file: Path) -> None:
        self.port = port
        self.count_file = count_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    async def start(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.mcp_server",
                "http",
                "--port",
                str(self.port),
                "--count-file",
                str(self.count_file),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await wait_listening(self.port, self.process, timeout=30)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
async def http_server(tmp_path: Path) -> AsyncIterator[HttpServer]:
    server = HttpServer(free_port(), tmp_path / "count")
    await server.start()
    yield server
    server.kill()


@pytest.fixture
def http_config(http_server: HttpServer) -> Iterator[dict[str, object]]:
    yield {
        "name": "web",
        "url": http_server.url,
        "headers": {"X-Test": "yes"},
        "prefix": "web",
        "ping_interval_s": 0.5,
        "restart_backoff_s": 0.1,
        "max_backoff_s": 0.5,
    }


async def test_http_server_tools_are_listed_and_called(http_config: dict[str, object]) -> None:
    source = McpSource(http_config)
    tools = by_name(await source.start())
    try:
        assert "web_add" in tools
        assert await tools["web_add"].call({"a": 40, "b": 2}, CTX) == "42"
    finally:
        await source.close()


async def test_http_server_restarted_on_the_same_port_is_reconnected(
    http_server: HttpServer, http_config: dict[str, object]
) -> None:
    source = McpSource(http_config)
    tools = by_name(await source.start())
    try:
        assert await tools["web_count"].call({}, CTX) == "1"

        http_server.kill()
        with pytest.raises(ToolFailed, match="MCP server web is restarting; try again"):
            await tools["web_count"].call({}, CTX)
        await http_server.start()
        await source.wait_up(timeout=30)

        assert await tools["web_count"].call({}, CTX) == "2"
        assert source.restarts == 1
    finally:
        await source.close()


async def test_an_agent_spec_with_an_mcp_server_calls_its_tools_in_the_loop(
    start_host: StartHost, client: ChorusClient, tmp_path: Path
) -> None:
    spec = load_spec(
        write_spec(
            tmp_path,
            "calc",
            "name: calc\ncapabilities: [calc]\ntools:\n"
            f"  - mcp: {{command: {sys.executable}, args: [-m, tests.mcp_server, stdio]}}\n"
            "    prefix: m\n",
        )
    )
    await start_host(Agent(spec))

    result = await client.run_task(Task(input="add them"), capability="calc")

    [call] = result.tool_calls
    assert (call.name, call.output, call.error) == ("m_add", "0", "")
    assert "(tool m_add: 0)" in result.output
