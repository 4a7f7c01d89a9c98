"""Shared provider limits as declared in `limits.yaml` (the file CHORUS_LIMITS names).

    window_s: 60                    # the "minute" of the limits (shorter in tests)
    reserve_output_tokens: 1024     # output tokens a call is expected to use, before it has
    limits:
      - name: openai-org            # its key in KV: processes with the same file share it
        api_key: OPENAI_API_KEY     # every call made with the key in this variable...
        requests_per_minute: 60
        tokens_per_minute: 20000
        concurrent: 16
      - name: gpt5
        model: openai:gpt-5         # ...or every call to this model, whatever the key
        requests_per_minute: 500

Every agent process that calls a matching model draws from the same allowance, kept in KV
(`chorus.spend.limiter`). A call may fall under several limits (its model's and its key's):
it waits for room in all of them. Calls with an API key also share that key's pauses: a 429
with `retry-after` stops every process calling that model with that key for that long.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import msgspec

from chorus.errors import ConfigError
from chorus.specs.loading import load_yaml
from chorus.spend.window import Rates
from chorus.subjects import check_token

DEFAULT_RESERVE_OUTPUT = 1024
DEFAULT_LEASE_S = 600.0  # a call whose process died frees its concurrency slot after this


def account_id(api_key: str) -> str:
    """An API key as it is named in KV keys: a hash, never the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


class LimitSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One limit: on a model (`model`), or on an API key (`api_key`: the environment
    variable that holds it), per `window_s` (default the file's, 60 s)."""

    name: str
    model: str = ""
    api_key: str = ""
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    concurrent: int = 0
    window_s: float | None = None
    margin_s: float | None = None

    def __post_init__(self) -> None:
        check_token(self.name, "limit name")
        if bool(self.model) == bool(self.api_key):
            raise ConfigError(f"limit {self.name}: give exactly one of `model` or `api_key`")
        counts = (self.requests_per_minute, self.tokens_per_minute, self.concurrent)
        if any(n < 0 for n in counts) or not any(counts):
            raise ConfigError(
                f"limit {self.name}: give requests_per_minute, tokens_per_minute or concurrent "
                "(more than 0)"
            )
        if self.window_s is not None and self.window_s <= 0:
            raise ConfigError(f"limit {self.name}: window_s must be more than 0")


class LimitsFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole file; an absent file is no limits at all."""

    limits: list[LimitSpec] = []
    window_s: float = 60.0
    reserve_output_tokens: int = DEFAULT_RESERVE_OUTPUT
    lease_s: float = DEFAULT_LEASE_S

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.lease_s <= 0 or self.reserve_output_tokens < 0:
            raise ConfigError(
                "limits: window_s and lease_s must be more than 0, reserve_output_tokens at least 0"
            )
        names = [limit.name for limit in self.limits]
        if len(set(names)) != len(names):
            raise ConfigError(f"limits: two limits have the same name in {names}")

    @classmethod
    def load(cls, path: str | Path) -> LimitsFile:
        return load_yaml(path, cls) if path else cls()

    def rates(self, limit: LimitSpec) -> Rates:
        return Rates(
            requests=limit.requests_per_minute,
            tokens=limit.tokens_per_minute,
            concurrent=limit.concurrent,
            window_s=limit.window_s or self.window_s,
            margin_s=limit.margin_s,
        )

    def matching(
        self, model: str, account: str, env: Mapping[str, str]
    ) -> list[tuple[LimitSpec, Rates]]:
        """The limits a call to `model` (`openai:gpt-5`) with the key named `account`
        falls under."""
        found = []
        for limit in self.limits:
            if limit.model:
                hit = limit.model == model
            else:
                key = env.get(limit.api_key, "").strip()
                hit = bool(account and key) and account_id(key) == account
            if hit:
                found.append((limit, self.rates(limit)))
        return found
