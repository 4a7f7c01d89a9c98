"""One MCP tool call over stdio against calling the same Python function in process.

The same `add` function is served by an MCP server child process (this module with
`--serve`, built with the SDK's MCPServer) and called through `chorus.tools.mcp.McpSource`,
and is called directly as an in-process tool; both are measured in the same run, one call
at a time. Prints only.

    python -m bench.mcp_tool            # 2000 calls each
    python -m bench.mcp_tool --smoke    # 50 calls each
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.harness import cli
from bench.harness.stats import Figure, ratio, sequential
from bench.harness.tables import versions_line
from chorus.tools.base import ToolCallContext
from chorus.tools.mcp import McpSource

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 20


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def serve() -> None:
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("bench", log_level="WARNING")
    server.tool()(add)
    server.run("stdio")


async def main(args: argparse.Namespace, where: Path) -> None:
    n = 50 if args.smoke else 2000
    ctx = ToolCallContext(agent="bench", instance="bench-1")
    source = McpSource(
        {
            "name": "bench",
            "command": sys.executable,
            "args": ["-m", "bench.mcp_tool", "--serve"],
            "cwd": str(ROOT),
        }
    )
    (tool,) = await source.start()
    try:

        async def over_mcp() -> object:
            return await tool.call({"a": 2, "b": 3}, ctx)

        async def in_process() -> object:
            return add(2, 3)

        for _ in range(WARMUP):
            await over_mcp()
        mcp = Figure("MCP stdio tool call (McpSource)", await sequential(over_mcp, n))
        local = Figure("same function in process", await sequential(in_process, n))
    finally:
        await source.close()

    print(versions_line())
    print(f"# {n} sequential calls each, after {WARMUP} warm-up MCP calls")
    print(mcp.line())
    print(local.line())
    print(f"MCP / in-process p50: {ratio(mcp.p50, local.p50)}")
    print(f"MCP overhead per call p50: {mcp.p50 - local.p50:.0f} us")


if __name__ == "__main__":
    if "--serve" in sys.argv[1:]:
        serve()
    else:
        parsed = cli.parser("bench.mcp_tool", __doc__).parse_args()
        raise SystemExit(cli.run(main, parsed, "chorus-bench-mcp-"))
