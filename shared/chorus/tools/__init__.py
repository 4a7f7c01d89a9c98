"""Tools an agent's model may call: Python functions, hosted provider tools, MCP servers, and
other agents reached over NATS, all behind one interface (`chorus.tools.base`)."""

from chorus.tools.base import Tool, ToolCallContext, ToolDefinition, ToolSource
from chorus.tools.python import PythonTool, tool

__all__ = ["PythonTool", "Tool", "ToolCallContext", "ToolDefinition", "ToolSource", "tool"]
