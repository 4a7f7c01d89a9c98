"""Agents: the spec, the Python API for handlers, and the host that runs an instance."""

from chorus.agent.api import Agent, Reply
from chorus.agent.context import Context
from chorus.specs.agent import AgentSpec, load_spec

__all__ = ["Agent", "AgentSpec", "Context", "Reply", "load_spec"]
