"""Tools an agent's model may call: Python functions, hosted provider tools, MCP servers, and
other agents reached over NATS, all behind one interface (`chorus.tools.base`)."""
