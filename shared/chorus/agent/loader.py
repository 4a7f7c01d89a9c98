"""Turn the SPEC argument of `chorus agent run` into an Agent: a YAML file or `module:attr`."""

from __future__ import annotations

from pathlib import Path

from chorus.agent.api import Agent, agent_from_spec, load_handler
from chorus.errors import ConfigError
from chorus.specs.agent import load_spec


def load_agent(reference: str) -> Agent:
    path = Path(reference)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"agent spec {reference} does not exist")
        return agent_from_spec(load_spec(path))
    if ":" in reference:
        return load_handler(reference, None)
    raise ConfigError(f"agent spec {reference!r} is neither a YAML file nor module:attribute")
