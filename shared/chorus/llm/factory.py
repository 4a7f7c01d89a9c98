"""Pick a provider from a model string: `offline`, `offline:<name>`, `openai:<model>`.

CHORUS_OFFLINE_CHUNK_DELAY (seconds) spaces the words the offline model streams, so a demo
shows live output as a real model would.
"""

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
    source = os.environ if env is None else env
    if provider == "offline":
        return OfflineModel(name, chunk_delay=_seconds(source, "CHORUS_OFFLINE_CHUNK_DELAY"))
    if provider == "openai":
        from chorus.llm.openai_provider import OpenAIModel

        return OpenAIModel.from_env(name, source, retry_rate_limits=retry_rate_limits)
    raise ConfigError(f"unknown model provider {provider!r} in {model!r}: use offline or openai")


def _seconds(env: Mapping[str, str], key: str) -> float:
    raw = env.get(key, "").strip()
    try:
        value = float(raw) if raw else 0.0
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"{key} must be a number of seconds, not {raw!r}")
    return value
