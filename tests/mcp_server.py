"""A small MCP server for the tests: `python -m tests.mcp_server stdio|http [--port N]
[--count-file PATH]`, built with the SDK's MCPServer (FastMCP in mcp 1.x)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError


def build(count_file: Path | None) -> MCPServer:
    server = MCPServer("chorus-test", log_level="WARNING")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def echo(text: str) -> str:
        """Say the text back."""
        return text

    @server.tool()
    def fail() -> str:
        """Always fails."""
        raise ToolError("the fail tool always fails")

    @server.tool()
    def count() -> int:
        """Append a line to the count file; return how many lines it has."""
        if count_file is None:
            raise RuntimeError("started without --count-file")
        with count_file.open("a") as sink:
            sink.write("x\n")
        return len(count_file.read_text().splitlines())

    @server.tool()
    def pid() -> int:
        """This server's process id, so a test can kill it."""
        return os.getpid()

    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--count-file", type=Path)
    args = parser.parse_args()
    server = build(args.count_file)
    if args.transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
