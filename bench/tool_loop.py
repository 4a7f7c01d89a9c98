"""The agent loop's own cost per tool turn, against a raw nats-py request-reply round trip.

In this process: the offline model (it calls the tool on the first turn and answers on the
second) and a trivial in-process Python tool, through `chorus.agent.loop.run_loop`. The loop
measures each turn's time outside the model's and the tools' awaits (`LoopResult.
overhead_ms`): argument parsing and validation, encoding the output, the records, the
semaphore and task group, building the next request. Measured with one call per tool turn
and with four calls in one turn, then the raw baseline (`bench.harness.baselines`:
cross-process core request-reply to a tiny nats-py responder on an embedded server) in the
same run, for scale. Target: at most 0.3 ms p50 per tool turn. Printed, never asserted.

    python -m bench.tool_loop            # 5,000 loops of each kind, about 10 s
    python -m bench.tool_loop --smoke    # 200 of each, a few seconds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench.harness import cli
from bench.harness.baselines import plain_payload, request_reply
from bench.harness.fleet import running_fleet
from bench.harness.stats import pct
from bench.harness.tables import markdown_table, versions_line
from chorus.agent.loop import run_loop
from chorus.agent.toolbox import Toolbox
from chorus.llm.base import FunctionCall, ModelRequest
from chorus.llm.offline import OfflineModel
from chorus.tools import ToolCallContext, tool

TARGET_MS = 0.3
PARALLEL = 4


@tool
async def echo(text: str) -> str:
    """Return the text."""
    return text


def context_for(call: FunctionCall) -> ToolCallContext:
    return ToolCallContext(agent="bench", instance="bench-1", call_id=call.call_id)


def parallel_script(request: ModelRequest) -> Any:
    """Four calls on the first turn, an answer once their outputs are in."""
    if request.items:
        return "done"
    return [
        FunctionCall(call_id=f"c{n}", name="echo", arguments='{"text": "x"}')
        for n in range(PARALLEL)
    ]


async def loop_costs(model: OfflineModel, n: int) -> tuple[list[float], list[float], float]:
    """Per loop: the tool turn's own cost (ms), the final turn's, and the mean wall time."""
    toolbox = Toolbox([echo])
    request = ModelRequest(model="offline", instructions="Echo it.", input="x" * 200)
    for _ in range(min(200, n)):  # warm-up
        await run_loop(model, request, toolbox, context_for)
    tool_turns, final_turns = [], []
    started = time.perf_counter()
    for _ in range(n):
        result = await run_loop(model, request, toolbox, context_for)
        tool_turns.append(result.overhead_ms[0])
        final_turns.append(result.overhead_ms[-1])
    wall_ms = (time.perf_counter() - started) * 1000 / n
    model.calls.clear()
    return tool_turns, final_turns, wall_ms


async def main(args: argparse.Namespace, workdir: Path) -> None:
    n = 200 if args.smoke else 5000
    single = await loop_costs(OfflineModel(), n)
    parallel = await loop_costs(OfflineModel(script=parallel_script), n)
    async with running_fleet(workdir, "benchtools") as fleet:
        raw, _ = await request_reply(
            fleet, plain_payload(), warmup=50, sequential_n=n, in_flight_n=PARALLEL
        )
    raw_p50, raw_p99 = raw.pct_us(0.5) / 1000, raw.pct_us(0.99) / 1000

    def row(label: str, values: list[float]) -> list[str]:
        p50, p99 = pct(values, 0.5), pct(values, 0.99)
        return [label, f"{p50:.3f}", f"{p99:.3f}", f"{p50 / raw_p50:.2f}x"]

    print(f"# Agent loop cost per turn ({n} loops each)\n\n{versions_line()}\n")
    print(
        markdown_table(
            ["", "p50 ms", "p99 ms", "p50 / raw req-reply p50"],
            [
                row("loop overhead per tool turn, 1 call", single[0]),
                row(f"loop overhead per tool turn, {PARALLEL} calls", parallel[0]),
                row("loop overhead of the final turn", single[1]),
                [
                    raw.label,
                    f"{raw_p50:.3f}",
                    f"{raw_p99:.3f}",
                    "1.00x",
                ],
            ],
        )
    )
    p50 = pct(single[0], 0.5)
    verdict = "within" if p50 <= TARGET_MS else "over"
    print(
        f"\n- loop overhead per tool turn p50 {p50:.3f} ms: {verdict} the {TARGET_MS} ms target"
        f" (beyond the tool and the model)"
    )
    print(
        f"- a whole two-turn loop with the offline model: {single[2]:.3f} ms mean"
        f" ({parallel[2]:.3f} ms with {PARALLEL} calls in the tool turn)"
    )


if __name__ == "__main__":
    raise SystemExit(cli.run(main, cli.parser(__name__, __doc__).parse_args(), "tool-loop-"))
