"""The price table: per model, USD per million input, cached input and output tokens.

Defaults ship in the package (`prices.yaml`, OpenAI list prices); `CHORUS_PRICES` names a
file in the same format whose entries replace them by model name. Every process that calls
a model prices its own calls, so every agent should see the same table.

    table = PriceTable.load(settings.prices)
    usage = table.priced("gpt-5-mini-2025-08-07", reply.usage)   # usage.usd filled in
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import msgspec

from chorus.errors import ConfigError
from chorus.messages import Usage
from chorus.specs.loading import load_yaml

log = logging.getLogger("chorus.spend.prices")

SHIPPED: Final = Path(__file__).with_name("prices.yaml")
_PER_TOKEN: Final = 1e-6  # prices are per million tokens


class Price(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """USD per million tokens."""

    input: float
    output: float
    cached_input: float | None = None  # default: the input price

    def __post_init__(self) -> None:
        if self.input < 0 or self.output < 0 or (self.cached_input or 0) < 0:
            raise ConfigError("prices must not be negative")

    def cost(self, usage: Usage) -> float:
        """What `usage` costs; cached tokens are part of the input tokens."""
        cached = min(usage.cached_tokens, usage.input_tokens)
        cached_price = self.input if self.cached_input is None else self.cached_input
        dollars = (
            (usage.input_tokens - cached) * self.input
            + cached * cached_price
            + usage.output_tokens * self.output
        )
        return dollars * _PER_TOKEN


class PriceFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    models: dict[str, Price]


class PriceTable:
    """Model name -> Price. A name not in the table is priced as the longest name in it that
    it starts with followed by `-` (dated snapshots); an unknown model costs 0, logged once."""

    def __init__(self, prices: dict[str, Price]) -> None:
        self.prices = dict(prices)
        self._unknown: set[str] = set()

    @classmethod
    def load(cls, override: str | Path = "") -> PriceTable:
        """The shipped table, with the entries of the `override` file (CHORUS_PRICES) on top."""
        prices = dict(load_yaml(SHIPPED, PriceFile).models)
        if override:
            prices.update(load_yaml(override, PriceFile).models)
        return cls(prices)

    def price(self, model: str) -> Price | None:
        name = model.partition(":")[2] if ":" in model else model
        found = self.prices.get(name)
        if found is not None:
            return found
        stems = [stem for stem in self.prices if name.startswith(f"{stem}-")]
        return self.prices[max(stems, key=len)] if stems else None

    def cost(self, model: str, usage: Usage) -> float:
        price = self.price(model)
        if price is None:
            if model not in self._unknown:
                self._unknown.add(model)
                log.warning(
                    "no price for this model: its calls cost 0 (add it with CHORUS_PRICES)",
                    extra={"model": model},
                )
            return 0.0
        return price.cost(usage)

    def priced(self, model: str, usage: Usage) -> Usage:
        """`usage` with `usd` set to what it costs on `model`."""
        return msgspec.structs.replace(usage, usd=self.cost(model, usage))
