"""An agent's models behind the spend controls: built from its spec, connected once the host
is (chorus.llm.limited, chorus.spend)."""

from __future__ import annotations

import os
from collections.abc import Callable

from nats.aio.client import Client

from chorus.config import Settings
from chorus.llm import Model, create_model
from chorus.llm.limited import Choice, LimitedModel
from chorus.specs.agent import AgentSpec
from chorus.spend.budgets import BudgetLedger
from chorus.spend.limiter import Limiter
from chorus.spend.limits import LimitsFile
from chorus.spend.prices import PriceTable


def agent_model(
    spec: AgentSpec,
    settings: Settings,
    model: Model | None = None,
    *,
    observe: Callable[[Model, str], Model] = lambda model, spec_model: model,
) -> LimitedModel:
    """The spec's model (or `model`, given in Python or by a test) and its `fallback`
    models, priced by the table CHORUS_PRICES overrides. Providers are built now, so a
    missing API key fails at start-up; a 429 is left to the LimitedModel. `observe` wraps
    each provider (tracing and metrics see the model that really answered)."""
    limits = LimitsFile.load(settings.limits)
    primary = model if model is not None else create_model(spec.model, retry_rate_limits=False)
    choices = [Choice(spec.model, observe(primary, spec.model))]
    choices += [
        Choice(m, observe(create_model(m, retry_rate_limits=False), m)) for m in spec.fallback
    ]
    return LimitedModel(
        choices,
        prices=PriceTable.load(settings.prices),
        agent=spec.name,
        agent_budget=spec.budget,
        fallback_after_s=spec.fallback_after_s,
        reserve_output_tokens=limits.reserve_output_tokens,
    )


async def attach_spend(model: LimitedModel, nc: Client, settings: Settings, instance: str) -> None:
    """Connect the shared limits (when a model has an API key or a limit applies) and the
    budgets bucket."""
    js = nc.jetstream()
    limits = LimitsFile.load(settings.limits)
    limiter = None
    if limits.limits or any(choice.account for choice in model.choices):
        limiter = await Limiter.open(js, settings.subjects, limits, os.environ, instance=instance)
    ledger = await BudgetLedger.open(js, settings.subjects, hold_s=limits.lease_s)
    await model.attach(settings.subjects, limiter, ledger)
