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


def create_model(
    model: str, env: Mapping[str, str] | None = None, *, retry_rate_limits: bool = True
) -> Model:
    """Build the provider for `model`. The openai package is imported only when it is used.

    `retry_rate_limits=False`: a 429 raises RateLimited at once instead of being retried by
    the provider (chorus.llm.limited retries it through the shared limits)."""
    provider, name = split_model(model)
    if provider == "offline":
        return OfflineModel(name)
    if provider == "openai":
        from chorus.llm.openai_provider import OpenAIModel

        source = os.environ if env is None else env
        return OpenAIModel.from_env(name, source, retry_rate_limits=retry_rate_limits)
    raise ConfigError(f"unknown model provider {provider!r} in {model!r}: use offline or openai")
