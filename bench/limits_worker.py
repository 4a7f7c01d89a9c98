"""One contending process of `bench.limits`: it prints `ready`, waits for `go` on stdin,
does its part and prints one JSON line of figures.

    python -m bench.limits_worker latency URL PREFIX LIMITS CALLERS CALLS MODEL_MS
    python -m bench.limits_worker budget URL PREFIX RUN_ID CALLERS CALLS MODEL_MS
    python -m bench.limits_worker demand URL PREFIX LIMITS CALLERS SECONDS WORDS BASE_URL

`latency`: CALLERS concurrent loops, each CALLS times: admit (timed) -> a simulated model
call of MODEL_MS -> settle (written with a later write). `budget`: the same with a hold
and a settle in one run's budget account (both timed). `demand`: CALLERS loops call
the real OpenAIModel behind a LimitedModel (the fake server at BASE_URL) for SECONDS.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import nats

from chorus.llm.base import ModelRequest
from chorus.llm.limited import Choice, LimitedModel
from chorus.llm.openai_provider import OpenAIModel
from chorus.messages import Usage
from chorus.spend.budgets import AccountRef, BudgetLedger
from chorus.spend.limiter import Limiter
from chorus.spend.limits import LimitsFile, account_id
from chorus.spend.prices import PriceTable
from chorus.subjects import Subjects

API_KEY = "sk-bench"
MODEL = "openai:gpt-bench"


async def ready_then_go() -> None:
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)


async def latency(
    url: str, prefix: str, limits: str, callers: int, calls: int, model_ms: float
) -> dict[str, Any]:
    nc = await nats.connect(url, name="bench-limits")
    env = {"OPENAI_API_KEY": API_KEY}
    limiter = await Limiter.open(nc.jetstream(), Subjects(prefix), LimitsFile.load(limits), env)
    gate = await limiter.gate(MODEL, account_id(API_KEY))
    admits: list[int] = []
    await ready_then_go()

    async def loop() -> None:
        for _ in range(calls):
            started = time.perf_counter_ns()
            permit = await gate.admit(500, wait=None)
            admits.append(time.perf_counter_ns() - started)
            await asyncio.sleep(model_ms / 1000)  # the model call
            permit.settle(300)

    await asyncio.gather(*(loop() for _ in range(callers)))
    await limiter.drain(30)
    out = {"admit_ns": admits, "conflicts": limiter.conflicts, "writes": limiter.writes}
    await limiter.close()
    await nc.close()
    return out


async def budget(
    url: str, prefix: str, run_id: str, callers: int, calls: int, model_ms: float
) -> dict[str, Any]:
    """Hold and settle each call in one run's budget account (the parent opened it)."""
    nc = await nats.connect(url, name="bench-budgets")
    subjects = Subjects(prefix)
    ledger = await BudgetLedger.open(nc.jetstream(), subjects)
    refs = [AccountRef(subjects.run_budget_key(run_id))]
    holds: list[int] = []
    settles: list[int] = []
    await ready_then_go()

    async def loop() -> None:
        for _ in range(calls):
            started = time.perf_counter_ns()
            reservation = await ledger.reserve(refs, 500, 0.001, fits_only=False)
            holds.append(time.perf_counter_ns() - started)
            await asyncio.sleep(model_ms / 1000)
            started = time.perf_counter_ns()
            await ledger.settle(reservation, Usage(200, 100, 300, usd=0.0005))
            settles.append(time.perf_counter_ns() - started)

    await asyncio.gather(*(loop() for _ in range(callers)))
    await nc.close()
    return {"hold_ns": holds, "settle_ns": settles, "conflicts": ledger.conflicts}


async def demand(
    url: str, prefix: str, limits: str, callers: int, seconds: float, words: int, base_url: str
) -> dict[str, Any]:
    nc = await nats.connect(url, name="bench-limits")
    config = LimitsFile.load(limits)
    env = {"OPENAI_API_KEY": API_KEY}
    limiter = await Limiter.open(nc.jetstream(), Subjects(prefix), config, env)
    provider = OpenAIModel("gpt-bench", api_key=API_KEY, base_url=base_url, retry_rate_limits=False)
    model = LimitedModel(
        [Choice(MODEL, provider)],
        prices=PriceTable.load(),
        reserve_output_tokens=config.reserve_output_tokens,
    )
    await model.attach(Subjects(prefix), limiter, None)
    # The first call of an openai client spends ~0.3 s on lazy imports: made before the
    # measured phase, under another key, so it neither counts nor waits.
    warm = OpenAIModel("warm-up", api_key="sk-warm", base_url=base_url)
    await warm.complete(ModelRequest(model="warm-up", instructions="warm", input="up"))
    await warm.close()
    text = " ".join(["lorem"] * words)
    await ready_then_go()
    deadline = time.monotonic() + seconds
    done = 0

    async def loop() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            request = ModelRequest(model="gpt-bench", instructions="Echo it.", input=text)
            await model.complete(request)
            done += 1

    await asyncio.gather(*(loop() for _ in range(callers)))
    await model.close()
    await nc.close()
    return {"calls": done}


def main() -> int:
    mode, *args = sys.argv[1:]
    if mode == "latency":
        url, prefix, limits, callers, calls, model_ms = args
        out = asyncio.run(latency(url, prefix, limits, int(callers), int(calls), float(model_ms)))
    elif mode == "budget":
        url, prefix, run_id, callers, calls, model_ms = args
        out = asyncio.run(budget(url, prefix, run_id, int(callers), int(calls), float(model_ms)))
    else:
        url, prefix, limits, callers, seconds, words, base_url = args
        out = asyncio.run(
            demand(url, prefix, limits, int(callers), float(seconds), int(words), base_url)
        )
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
