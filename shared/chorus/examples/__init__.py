"""Example agent specs and workflows shipped with Chorus (used by `chorus demo` and `chorus up`)."""

from pathlib import Path

EXAMPLES = Path(__file__).parent
AGENTS = EXAMPLES / "agents"
WORKFLOWS = EXAMPLES / "workflows"
