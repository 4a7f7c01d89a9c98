"""Pick a provider from a model string: `offline`, `offline:<name>`, `openai:<model>`."""

from __future__ import annotations

import os
from collections.abc import Mapping

from chorus.errors import ConfigError
from chorus.llm.base import Model
from chorus.llm.offline import OfflineModel


def split_model(model: str) -> tuple[str, str]:
    """`openai:gpt-5-mini` -> ("openai", "gpt-5-mini"); a bare name means the offline model."""
    provider, _, name = model.partition(":")
    if not name:
        return ("offline", model) if model == "offline" else ("openai", model)
    return provider, name


def create_model(model: str, env: Mapping[str, str] | None = None) -> Model:
    """Build the provider for `model`. The openai package is imported only when it is used."""
    provider, name = split_model(model)
    if provider == "offline":
        return OfflineModel(name)
    if provider == "openai":
        from chorus.llm.openai_provider import OpenAIModel

        return OpenAIModel.from_env(name, os.environ if env is None else env)
    raise ConfigError(f"unknown model provider {provider!r} in {model!r}: use offline or openai")
