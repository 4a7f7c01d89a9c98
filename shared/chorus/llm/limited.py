"""`LimitedModel`: an agent's models behind shared limits, budgets, prices and fallbacks.

It implements `Model`, so the loop and the providers do not change. Per call, in order:

1. budgets: the call's expected tokens and dollars are held in its run's account and its
   agent's (`chorus.spend.budgets`); a spent account stops the call (`budget_exceeded`),
   or, with policy `wrap_up`, lets one last turn go without tools;
2. limits: the call waits for room in every shared limit of its model and API key, and for
   any provider pause on them (`chorus.spend.limiter`);
3. the provider's call; a 429 pauses every process using that model and key for its
   `retry-after`, then the call tries again;
4. what it used is priced (`chorus.spend.prices`), settled in the limits (in the
   background) and in the budgets (before the reply goes on, so the next step sees it).

The agent's `fallback` models are tried in order when one is rate-limited for longer than
`fallback_after_s`, has no budget left for the call, or fails; the reply says which model
answered. `for_task(run_id)` gives the view one task uses: its run's budget, and the models
and usage it had, for its Result.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from chorus.errors import BudgetExceeded, ModelError, RateLimited
from chorus.llm.base import (
    AssistantMessage,
    FunctionCall,
    FunctionCallOutput,
    Item,
    Model,
    ModelEvent,
    ModelReply,
    ModelRequest,
    UserMessage,
)
from chorus.llm.factory import split_model
from chorus.messages import BudgetAccount, Usage
from chorus.specs.budget import AgentBudget
from chorus.spend.budgets import AccountRef, BudgetLedger, Reservation
from chorus.spend.limiter import Gate, Limiter
from chorus.spend.prices import PriceTable
from chorus.subjects import Subjects

log = logging.getLogger("chorus.llm.limited")

CHARS_PER_TOKEN: Final = 4  # English text; the expectation errs high on most prompts
WRAP_UP: Final = (
    "The budget for this work is spent: this is your last turn, and no tools are available. "
    "Give your best final answer now from what you have."
)
_encoder = msgspec.json.Encoder()


class _FallBack(Exception):
    """This model cannot take the call now: try the next one (never escapes the module)."""


@dataclass(frozen=True)
class Choice:
    """One model an agent may use: as written in its spec, and its provider."""

    spec: str  # `openai:gpt-5`
    model: Model

    @property
    def name(self) -> str:
        return split_model(self.spec)[1]

    @property
    def account(self) -> str:
        """The hash of the model's API key ("" for a model without one): calls with the
        same key share its limits and pauses."""
        return str(getattr(self.model, "account", ""))


def expected_tokens(request: ModelRequest) -> int:
    """The input tokens a request is expected to use: its characters / 4, rounded up."""
    chars = len(request.instructions) + len(request.input)
    for item in (*request.history, *request.items):
        chars += len(_encoder.encode(item))
    if request.tools:
        chars += len(_encoder.encode(request.tools))
    if request.json_schema is not None:
        chars += len(_encoder.encode(request.json_schema))
    return math.ceil(chars / CHARS_PER_TOKEN)


def wrap_up_request(request: ModelRequest) -> ModelRequest:
    """The last turn: no tools, the tool calls so far as plain text, and the instruction
    to answer now."""
    items: list[Item] = []
    for item in request.items:
        if isinstance(item, FunctionCall):
            items.append(AssistantMessage(text=f"[called {item.name}({item.arguments})]"))
        elif isinstance(item, FunctionCallOutput):
            items.append(UserMessage(text=f"[result of {item.call_id}]: {item.output}"))
        elif isinstance(item, AssistantMessage | UserMessage):
            items.append(item)
    instructions = f"{request.instructions}\n\n{WRAP_UP}" if request.instructions else WRAP_UP
    return msgspec.structs.replace(
        request, instructions=instructions, items=tuple(items), tools=(), hosted_tools=()
    )


def _backoff(attempt: int) -> float:
    return random.uniform(0.5, 1.0) * min(30.0, 0.5 * 2.0 ** (attempt - 1))


class LimitedModel:
    """The agent's model and its fallbacks, behind the spend controls (see the module).

    Without `attach` (no NATS yet, or a test) it prices and falls back only."""

    def __init__(
        self,
        choices: Sequence[Choice],
        *,
        prices: PriceTable,
        agent: str = "",
        agent_budget: AgentBudget | None = None,
        fallback_after_s: float = 10.0,
        reserve_output_tokens: int = 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not choices:
            raise ValueError("a LimitedModel needs at least one model")
        self.choices = list(choices)
        self.prices = prices
        self.agent = agent
        self.agent_budget = agent_budget
        self.fallback_after_s = fallback_after_s
        self.reserve_output_tokens = reserve_output_tokens
        self.clock = clock
        self.limiter: Limiter | None = None
        self.ledger: BudgetLedger | None = None
        self.subjects: Subjects | None = None

        self.name = self.choices[0].model.name
        self.hosted_tools = bool(getattr(self.choices[0].model, "hosted_tools", False))

    async def attach(
        self, subjects: Subjects, limiter: Limiter | None, ledger: BudgetLedger | None
    ) -> None:
        """Connect the shared limits and the budgets; the gates of every model open now, so
        the first call waits for nothing but its room."""
        self.subjects, self.limiter, self.ledger = subjects, limiter, ledger
        if limiter is not None:
            for choice in self.choices:
                await limiter.gate(choice.spec, choice.account)

    def for_task(self, run_id: str = "") -> TaskModel:
        """The view of one task: charged to `run_id`'s budget (if it has one) and the
        agent's."""
        return TaskModel(self, run_id)

    async def complete(self, request: ModelRequest) -> ModelReply:
        return await self.for_task().complete(request)

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        async for event in self.for_task().stream(request):
            yield event

    async def close(self) -> None:
        if self.limiter is not None:
            await self.limiter.close()  # settles in flight first
        for choice in self.choices:
            await choice.model.close()

    def accounts(self, run_id: str) -> list[AccountRef]:
        """The budget accounts a call of a task of `run_id` is charged to."""
        if self.subjects is None or self.ledger is None:
            return []
        refs = [AccountRef(self.subjects.run_budget_key(run_id))] if run_id else []
        if self.agent_budget is not None and self.agent:
            now = datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)
            policy = self.agent_budget.policy
            for period, tokens, usd in self.agent_budget.periods():
                stamp = now.strftime("%Y%m%d%H" if period == "hour" else "%Y%m%d")
                key = self.subjects.agent_budget_key(self.agent, period, stamp)
                account = BudgetAccount(tokens=tokens, usd=usd, policy=policy)
                refs.append(AccountRef(key, create=account))
        return refs

    async def gate(self, choice: Choice) -> Gate | None:
        return (
            None if self.limiter is None else await self.limiter.gate(choice.spec, choice.account)
        )


class TaskModel:
    """One task's use of a LimitedModel (a `Model` too): what it spent, by model."""

    def __init__(self, owner: LimitedModel, run_id: str) -> None:
        self.owner = owner
        self.run_id = run_id
        self.name = owner.name
        self.hosted_tools = owner.hosted_tools
        self.by_model: dict[str, Usage] = {}
        self.last_model = ""
        self.wrapped_up = False  # the one `wrap_up` turn was given

    @property
    def usage(self) -> Usage:
        """What this task's own model calls used (its delegated work is not in it)."""
        return sum(self.by_model.values(), Usage())

    async def close(self) -> None:
        """Nothing to close: the LimitedModel owns the providers."""

    async def complete(self, request: ModelRequest) -> ModelReply:
        reply: ModelReply | None = None
        async for event in self._run(request, streamed=False):
            if isinstance(event, ModelReply):
                reply = event
        assert reply is not None  # _run ends with the reply or raises
        return reply

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        """`complete`, streamed: the provider's text deltas as they come, then the reply.
        A fallback is taken only before the first delta (what was shown stays shown)."""
        async for event in self._run(request, streamed=True):
            yield event

    async def _run(self, request: ModelRequest, *, streamed: bool) -> AsyncIterator[ModelEvent]:
        owner = self.owner
        refs = owner.accounts(self.run_id)
        for index, choice in enumerate(owner.choices):
            last = index == len(owner.choices) - 1
            try:
                async for event in self._attempt(choice, request, refs, last, streamed):
                    if isinstance(event, ModelReply):
                        self.by_model[event.model] = (
                            self.by_model.get(event.model, Usage()) + event.usage
                        )
                        self.last_model = event.model
                    yield event
                return
            except _FallBack as why:
                following = owner.choices[index + 1].spec
                log.warning(
                    "model unavailable, trying the next fallback",
                    extra={"model": choice.spec, "next": following, "reason": str(why)},
                )
        raise AssertionError("the last model never falls back")  # pragma: no cover

    async def _attempt(
        self,
        choice: Choice,
        request: ModelRequest,
        refs: list[AccountRef],
        last: bool,
        streamed: bool,
    ) -> AsyncIterator[ModelEvent]:
        owner = self.owner
        ask = (
            request
            if request.model == choice.name
            else msgspec.structs.replace(request, model=choice.name)
        )
        tokens_in = expected_tokens(ask)
        tokens = tokens_in + owner.reserve_output_tokens
        usd = owner.prices.cost(choice.name, Usage(tokens_in, owner.reserve_output_tokens, tokens))
        reservation: Reservation | None = None
        wrap_up = False
        if refs and owner.ledger is not None:
            reservation = await owner.ledger.reserve(refs, tokens, usd, fits_only=not last)
            if reservation.too_big:
                raise _FallBack(f"not enough budget left: {_budget_text(reservation.too_big)}")
            if reservation.spent:
                wrap_up = self._may_wrap_up(reservation.spent)
                if not wrap_up:
                    raise BudgetExceeded(_budget_reason(reservation.spent))
                self.wrapped_up = True
                ask = wrap_up_request(ask)
        reply: ModelReply | None = None
        try:
            async for event in self._call(choice, ask, tokens, last, streamed):
                if isinstance(event, ModelReply):
                    reply = event
                else:
                    yield event
        except BaseException:
            if reservation is not None and reservation.holds and owner.ledger is not None:
                await asyncio.shield(owner.ledger.settle(reservation, None))
            raise
        assert reply is not None  # _call ends with the reply or raises
        model = reply.model or choice.name
        usage = owner.prices.priced(model, reply.usage)
        if owner.ledger is not None:
            if reservation is not None and reservation.holds:
                await owner.ledger.settle(reservation, usage)
            elif wrap_up:
                await owner.ledger.charge(refs, usage)
        yield msgspec.structs.replace(reply, usage=usage, model=model)

    def _may_wrap_up(self, spent: list[tuple[str, BudgetAccount]]) -> bool:
        return not self.wrapped_up and all(a.policy == "wrap_up" for _, a in spent)

    async def _call(
        self, choice: Choice, ask: ModelRequest, tokens: int, last: bool, streamed: bool
    ) -> AsyncIterator[ModelEvent]:
        """The provider's call through the model's gate: waits for room, pauses everyone on
        a 429 and tries again (as many times as the provider would have). Streamed, the
        deltas go on as they come; once one has, a failure is the caller's, not retried."""
        owner = self.owner
        gate = await owner.gate(choice)
        wait = None if last else owner.fallback_after_s
        attempts = int(getattr(choice.model, "max_retries", 3)) + 1
        cap = float(getattr(choice.model, "retry_after_cap", 30.0))
        for attempt in range(1, attempts + 1):
            permit = None
            if gate is not None:
                try:
                    permit = await gate.admit(tokens, wait=wait)
                except RateLimited as exc:
                    raise _FallBack(exc.reason) from None
            began = False
            reply: ModelReply | None = None
            try:
                if streamed:
                    events = choice.model.stream(ask)
                    try:
                        async for event in events:
                            if isinstance(event, ModelReply):
                                reply = event
                            else:
                                began = True
                                yield event
                    finally:  # a reader that stops early closes the provider's stream
                        close = getattr(events, "aclose", None)
                        if close is not None:
                            await close()
                else:
                    reply = await choice.model.complete(ask)
            except RateLimited as exc:
                if permit is not None:
                    permit.settle(0)  # the request counts; no tokens were used
                if began:
                    raise
                seconds = min(
                    cap, exc.retry_after if exc.retry_after is not None else _backoff(attempt)
                )
                if gate is not None:
                    await gate.rate_limited(seconds, exc.reason)
                if not last and seconds > owner.fallback_after_s:
                    raise _FallBack(exc.reason) from None
                if attempt == attempts:
                    raise
                if gate is None:
                    await asyncio.sleep(seconds)  # no shared pause to wait on: back off here
                continue
            except ModelError as exc:
                if permit is not None:
                    permit.settle(0)
                if last or began:
                    raise
                raise _FallBack(exc.reason) from None
            except BaseException:
                if permit is not None:
                    permit.settle(0)
                raise
            if reply is None:
                raise ModelError(f"model {choice.spec}: the stream ended without a reply")
            if permit is not None:
                permit.settle(reply.usage.total_tokens)
            yield reply
            return
        raise AssertionError("unreachable")  # pragma: no cover


def _budget_text(accounts: list[tuple[str, BudgetAccount]]) -> str:
    """`budget run.abc: 1,200 of 1,000 tokens spent; ...`"""
    return "; ".join(f"budget {key}: {account.describe()}" for key, account in accounts)


def _budget_reason(spent: list[tuple[str, BudgetAccount]]) -> str:
    return f"{_budget_text(spent)}; no more model calls for this work"
