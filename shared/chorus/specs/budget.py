"""Budgets as users write them: on a run (`budget:` in a workflow file, or on a RunRequest)
and on an agent (`budget:` in its spec, per hour and per day).

    budget: {tokens: 50000, usd: 0.50, policy: stop}        # a workflow's, for each run

    budget:                                                 # an agent's
      usd_per_day: 5
      tokens_per_hour: 200000
      policy: wrap_up

`policy` says what happens when a budget is spent: `stop` (the next model call fails with
code `budget_exceeded`, and so does the run) or `wrap_up` (the agent gets one last model
turn without tools to give its best answer; the run then starts no further steps).
How budgets are kept and charged: `chorus.spend.budgets`.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from chorus.errors import InvalidSpec, InvalidWorkflow

BudgetPolicy = Literal["stop", "wrap_up"]


class RunBudget(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """Tokens and/or dollars one run may spend, its delegated work included (peer tools,
    subtasks: every task carries the run id). 0 means no limit on that measure."""

    tokens: int = 0
    usd: float = 0.0
    policy: BudgetPolicy = "stop"

    def __post_init__(self) -> None:
        if self.tokens < 0 or self.usd < 0:
            raise InvalidWorkflow("`budget`: tokens and usd must not be negative")
        if not self.tokens and not self.usd:
            raise InvalidWorkflow("`budget`: give tokens, usd or both (more than 0)")


class AgentBudget(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """What one agent (all its instances together) may spend per clock hour and per day
    (UTC). 0 means no limit on that measure."""

    tokens_per_hour: int = 0
    tokens_per_day: int = 0
    usd_per_hour: float = 0.0
    usd_per_day: float = 0.0
    policy: BudgetPolicy = "stop"

    def __post_init__(self) -> None:
        limits = (self.tokens_per_hour, self.tokens_per_day, self.usd_per_hour, self.usd_per_day)
        if any(limit < 0 for limit in limits):
            raise InvalidSpec("budget: limits must not be negative")
        if not any(limits):
            raise InvalidSpec(
                "budget: give at least one of tokens_per_hour, tokens_per_day, usd_per_hour, "
                "usd_per_day"
            )

    def periods(self) -> list[tuple[str, int, float]]:
        """(`hour` or `day`, tokens, usd) for each period that has a limit."""
        out = []
        if self.tokens_per_hour or self.usd_per_hour:
            out.append(("hour", self.tokens_per_hour, self.usd_per_hour))
        if self.tokens_per_day or self.usd_per_day:
            out.append(("day", self.tokens_per_day, self.usd_per_day))
        return out
