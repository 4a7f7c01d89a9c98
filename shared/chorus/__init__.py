"""Chorus: a runtime for teams of LLM agents that run as separate processes over NATS."""

__version__ = "0.1.0"
