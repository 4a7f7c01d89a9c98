"""MCP servers as a tool source: stdio (a child process) or streamable HTTP (a URL).

`McpSource(config)` is a `ToolSource`. One supervisor task per server owns the SDK's
transport and `ClientSession` context managers (their anyio cancel scopes must be entered
and left in one task); tool calls from other tasks use the session that task holds. When
the connection is lost (the process exits, the HTTP server goes away, a ping fails) the
supervisor reconnects with backoff; meanwhile calls fail at once with a `ToolFailed` that
says the server is restarting, and they work again once it is back. `close()` leaves the
contexts in the supervisor task, so the child process is stopped and reaped.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, TextIO

import anyio
import httpx2
import msgspec
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types.jsonrpc import CONNECTION_CLOSED

from chorus.errors import ConfigError, ToolFailed
from chorus.tools.base import DEFAULT_TOOL_TIMEOUT_S, MAX_TOOL_NAME, ToolCallContext, ToolDefinition

__all__ = ["McpServerConfig", "McpSource", "McpTool", "result_output"]

log = logging.getLogger("chorus.tools.mcp")

_TOOL_NAME: Final = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_TOOL_NAME}}}$")
# The SDK reports a session the server no longer knows (it restarted) with this message.
_SESSION_GONE: Final = "Session terminated"


class McpServerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One MCP server: `command` (stdio) or `url` (streamable HTTP), not both."""

    name: str = ""  # how errors and logs call it; default: the prefix, command or URL
    command: str = ""
    args: list[str] = []
    env: dict[str, str] = {}  # added to a minimal default environment (the SDK's)
    cwd: str = ""
    url: str = ""
    headers: dict[str, str] = {}
    prefix: str = ""  # tools are called `<prefix>_<name>` when set
    timeout_s: float = DEFAULT_TOOL_TIMEOUT_S  # per call
    start_timeout_s: float = 30.0  # to start or connect and list the tools
    ping_interval_s: float = 5.0  # an idle connection is checked this often
    restart_backoff_s: float = 0.5  # the first wait before a restart, doubling ...
    max_backoff_s: float = 10.0  # ... up to this

    @property
    def label(self) -> str:
        return self.name or self.prefix or self.command or self.url

    def check(self) -> McpServerConfig:
        if bool(self.command) == bool(self.url):
            raise ConfigError(
                f"MCP server {self.label!r} needs exactly one of `command` (stdio) or `url` "
                "(streamable HTTP)"
            )
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"MCP server url {self.url!r} must start with http:// or https://")
        for what, value in (
            ("timeout_s", self.timeout_s),
            ("start_timeout_s", self.start_timeout_s),
            ("ping_interval_s", self.ping_interval_s),
            ("restart_backoff_s", self.restart_backoff_s),
            ("max_backoff_s", self.max_backoff_s),
        ):
            if not value > 0:
                raise ConfigError(f"MCP server {self.label!r}: {what} must be above 0, got {value}")
        return self

    @classmethod
    def parse(cls, raw: McpServerConfig | dict[str, Any]) -> McpServerConfig:
        """A config from a spec's mapping, with an error naming the wrong field."""
        if isinstance(raw, McpServerConfig):
            return raw.check()
        try:
            return msgspec.convert(raw, cls, strict=False).check()
        except msgspec.ValidationError as exc:
            raise ConfigError(f"MCP server config is invalid: {exc}") from None


def tool_name(prefix: str, name: str, server: str) -> str:
    full = f"{prefix}_{name}" if prefix else name
    if not _TOOL_NAME.fullmatch(full):
        raise ConfigError(
            f"MCP server {server!r} has a tool named {full!r}, which is not a valid tool name: "
            f"use 1 to {MAX_TOOL_NAME} letters, digits, '_' or '-' (choose a shorter prefix)"
        )
    return full


def _content_text(item: Any) -> str:
    if isinstance(item, types.TextContent):
        return item.text
    if isinstance(item, types.ImageContent | types.AudioContent):
        kind = "image" if isinstance(item, types.ImageContent) else "audio"
        return f"[{kind}: {item.mime_type}, {len(item.data) * 3 // 4} bytes, not shown]"
    if isinstance(item, types.EmbeddedResource):
        resource = item.resource
        if isinstance(resource, types.TextResourceContents):
            return resource.text
        return f"[resource {resource.uri}: {resource.mime_type or 'binary'}, not shown]"
    if isinstance(item, types.ResourceLink):
        return f"[resource link {item.name}: {item.uri}]"
    return f"[{getattr(item, 'type', 'content')} content, not shown]"


def result_output(result: types.CallToolResult) -> Any:
    """What the model reads: the content as text (media as a short note); the structured
    content when there is no content at all (servers should send both)."""
    if result.content:
        return "\n".join(_content_text(item) for item in result.content)
    if result.structured_content is not None:
        return result.structured_content
    return ""


class _Connection:
    """One live session; `lost` is set by whoever first sees it fail."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session
        self.lost = asyncio.Event()


class McpTool:
    """One tool of an MCP server, called through the source's current connection."""

    def __init__(self, source: McpSource, remote_name: str, definition: ToolDefinition) -> None:
        self._source = source
        self.remote_name = remote_name
        self._definition = definition

    @property
    def definition(self) -> ToolDefinition:
        return self._definition

    async def call(self, arguments: dict[str, Any], ctx: ToolCallContext) -> Any:
        return await self._source.call(self.remote_name, arguments, self._definition.timeout_s)


class McpSource:
    """The tools of one MCP server, kept connected while the source is open."""

    def __init__(self, config: McpServerConfig | dict[str, Any], *, errlog: TextIO | None = None):
        self.config = McpServerConfig.parse(config)
        self._errlog = errlog or sys.stderr
        self._conn: _Connection | None = None
        self._up = asyncio.Event()
        self._closing = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._first: asyncio.Future[list[types.Tool]] | None = None
        self.restarts = 0  # connections made after the first

    @property
    def name(self) -> str:
        return self.config.label

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.lost.is_set()

    async def start(self) -> Sequence[McpTool]:
        """Start (or connect to) the server and list its tools; ConfigError if it cannot."""
        if self._supervisor is not None:
            raise ConfigError(f"MCP server {self.name!r} is already started")
        self._first = asyncio.get_running_loop().create_future()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"chorus-mcp-{self.name}")
        try:
            async with asyncio.timeout(self.config.start_timeout_s):
                listed = await asyncio.shield(self._first)
            return [self._tool(tool) for tool in listed]
        except TimeoutError:
            await self.close()
            raise ConfigError(
                f"MCP server {self.name!r} did not start within {self.config.start_timeout_s:g}s"
            ) from None
        except BaseException:
            await self.close()
            raise

    def _tool(self, tool: types.Tool) -> McpTool:
        read_only = tool.annotations is not None and tool.annotations.read_only_hint is True
        definition = ToolDefinition(
            name=tool_name(self.config.prefix, tool.name, self.name),
            description=tool.description or tool.title or "",
            parameters=tool.input_schema,
            side_effect=not read_only,  # MCP's default: a tool may change the world
            timeout_s=self.config.timeout_s,
        )
        return McpTool(self, tool.name, definition)

    async def wait_up(self, timeout: float) -> None:
        """Wait until the server is connected (after a restart); TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout):
            await self._up.wait()

    async def call(self, name: str, arguments: dict[str, Any], timeout_s: float) -> Any:
        """Call the MCP tool `name`; its output, or ToolFailed with the reason."""
        conn = self._conn
        if conn is None or conn.lost.is_set():
            raise self._restarting()
        try:
            with anyio.fail_after(timeout_s):
                result = await conn.session.call_tool(name, arguments)
        except TimeoutError:
            raise ToolFailed(
                f"MCP tool {name!r} of server {self.name!r} did not answer within {timeout_s:g}s"
            ) from None
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED or exc.message == _SESSION_GONE:
                self._lose(conn, exc)
                raise self._restarting() from None
            raise ToolFailed(f"MCP tool {name!r} of server {self.name!r}: {exc.message}") from None
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            self._lose(conn, exc)
            raise self._restarting() from None
        if result.is_error:
            reason = result_output(result) or "the tool reported an error"
            raise ToolFailed(f"MCP tool {name!r} failed: {reason}")
        return result_output(result)

    def _restarting(self) -> ToolFailed:
        return ToolFailed(f"MCP server {self.name} is restarting; try again")

    def _lose(self, conn: _Connection, cause: BaseException) -> None:
        if not conn.lost.is_set():
            log.warning(
                "MCP server connection lost", extra={"server": self.name, "error": repr(cause)}
            )
        conn.lost.set()
        if self._conn is conn:
            self._conn = None
            self._up.clear()

    async def close(self) -> None:
        """Disconnect and stop the server (a stdio child is terminated and reaped)."""
        self._closing.set()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is None:
            return
        if self._conn is not None:
            self._conn.lost.set()  # the supervisor leaves its contexts in its own task
        done, _ = await asyncio.wait([supervisor], timeout=self.config.start_timeout_s)
        if not done:
            supervisor.cancel()
            await asyncio.wait([supervisor])

    # --- the supervisor task -------------------------------------------------------------

    def _transport(self) -> AbstractAsyncContextManager[Any]:
        config = self.config
        if config.command:
            params = StdioServerParameters(
                command=config.command,
                args=list(config.args),
                env=dict(config.env) or None,
                cwd=config.cwd or None,
            )
            return stdio_client(params, errlog=self._errlog)
        return self._http()

    @asynccontextmanager
    async def _http(self) -> AsyncIterator[Any]:
        async with (
            # The SDK's own defaults: a long read timeout, since a server may hold a stream open.
            httpx2.AsyncClient(
                headers=dict(self.config.headers), timeout=httpx2.Timeout(30.0, read=300.0)
            ) as http,
            streamable_http_client(self.config.url, http_client=http) as streams,
        ):
            yield streams

    async def _supervise(self) -> None:
        delay = self.config.restart_backoff_s
        while not self._closing.is_set():
            try:
                connected = await self._serve_once()
            except Exception as exc:  # the server failed to start, or the connection broke
                if self._first is not None and not self._first.done():
                    self._first.set_exception(
                        ConfigError(f"MCP server {self.name!r} did not start: {_describe(exc)}")
                    )
                    return
                log.warning(
                    "MCP server connection failed",
                    extra={"server": self.name, "error": _describe(exc)},
                )
                connected = False
            if connected:
                delay = self.config.restart_backoff_s
            if self._closing.is_set():
                return
            # A schedule, not a wait for a condition: close() cuts it short.
            with anyio.move_on_after(delay):
                await self._closing.wait()
            delay = min(delay * 2, self.config.max_backoff_s)

    async def _serve_once(self) -> bool:
        """Connect, list, serve until the connection is lost or the source closes.
        True when it got as far as serving."""
        async with self._transport() as (read, write), ClientSession(read, write) as session:
            with anyio.fail_after(self.config.start_timeout_s):
                await session.initialize()
                listed = await _list_tools(session)
            conn = _Connection(session)
            self._conn = conn
            self._up.set()
            if self._first is not None and not self._first.done():
                self._first.set_result(listed)
            else:
                self.restarts += 1
                log.info("MCP server reconnected", extra={"server": self.name})
            try:
                await self._watch(conn)
            finally:
                if self._conn is conn:
                    self._conn = None
                    self._up.clear()
            return True

    async def _watch(self, conn: _Connection) -> None:
        """Return when the connection is lost: a caller saw it fail, or a ping did."""
        while not conn.lost.is_set() and not self._closing.is_set():
            with anyio.move_on_after(self.config.ping_interval_s):
                await conn.lost.wait()
            if conn.lost.is_set() or self._closing.is_set():
                return
            try:
                with anyio.fail_after(self.config.ping_interval_s):
                    await conn.session.send_ping()
            except Exception as exc:
                self._lose(conn, exc)
                return


async def _list_tools(session: ClientSession) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor: str | None = None
    while True:
        params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools


def _describe(exc: BaseException) -> str:
    """The first real error inside the task groups' exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
