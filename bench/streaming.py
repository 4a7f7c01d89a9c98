"""Live output: what streaming a task's text through Chorus adds to its first token, and what
a chunk costs, against raw nats-py figures measured in the same run.

One embedded nats-server and one agent process (`python -m chorus agent run SPEC`, offline
model, the handler `bench.streaming_agent:timed`: it streams the model's deltas into the
task's live output as the agent loop does). This process sends the tasks one at a time and
reads the run's chunks with `ChorusClient.stream` (an ordered JetStream consumer on its own
connection). One machine, so CLOCK_MONOTONIC stamps compare across the two processes.

- the offline provider alone: `OfflineModel.stream`, from the call to its first delta;
- through Chorus: from the agent starting the model to this process reading the first chunk
  (model → TaskStream → JetStream publish, stored → ordered consumer → reader); what Chorus
  adds is that minus the model's own time to its first delta;
- per chunk, one at a time: raw nats-py core publish → a subscriber on another connection,
  and JetStream publish (ack awaited) → an ordered consumer on another connection;
- per chunk in a burst of 50 (tool-call chunks, never held by batching): Chorus against the
  same 50 published raw, core and JetStream;
- the task's round trip streamed, against the same handler calling `complete` (the final
  chunk is stored before the answer goes).

Target: at most 1 ms p50 added to the first token. Printed, never asserted.

    python -m bench.streaming           # 1,000 tasks of each kind, about 30 s on 2 cores
    python -m bench.streaming --smoke   # 50 of each, a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import defaultdict
from pathlib import Path

import nats
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from bench.harness import cli
from bench.harness.fleet import Fleet, running_fleet
from bench.harness.stats import pct
from bench.harness.tables import markdown_table, versions_line
from bench.streaming_agent import BURST
from chorus.client import ChorusClient
from chorus.llm import ModelRequest, TextDelta
from chorus.llm.offline import OfflineModel
from chorus.messages import StreamChunk, Task

PREFIX = "benchlive"
RUN = "bench-live"
TARGET_MS = 1.0
TIMEOUT_S = 30.0
INPUT = "what makes a message system a good fit for a team of agents " * 4  # ~50 words
RAW_STREAM = "BENCHRAW_LIVE"
RAW_SUBJECT = "benchraw.live.chunk"

SPEC = """\
name: bencher
model: offline
instructions: Answer at once.
capabilities: [stream]
handler: bench.streaming_agent:timed
max_concurrency: 4
"""


def ms(ns: float) -> float:
    return ns / 1e6


class Arrivals:
    """When this process read each task's chunks (monotonic ns), from one reader."""

    def __init__(self) -> None:
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.count: defaultdict[str, int] = defaultdict(int)
        self.changed = asyncio.Event()

    def add(self, chunk: StreamChunk) -> None:
        at = time.monotonic_ns()
        self.first.setdefault(chunk.task_id, at)
        self.last[chunk.task_id] = at
        self.count[chunk.task_id] += 1
        self.changed.set()

    async def until(self, task_id: str, chunks: int) -> None:
        async with asyncio.timeout(TIMEOUT_S):
            while self.count[task_id] < chunks:
                self.changed.clear()
                await self.changed.wait()


async def provider_alone(n: int) -> list[float]:
    """OfflineModel.stream: call → first delta, ms."""
    model = OfflineModel()
    request = ModelRequest(model="offline", instructions="Answer at once.", input=INPUT)
    out = []
    for _ in range(n):
        started = time.monotonic_ns()
        async for event in model.stream(request):
            if isinstance(event, TextDelta):
                out.append(ms(time.monotonic_ns() - started))
                break
    return out


async def through_chorus(
    client: ChorusClient, arrivals: Arrivals, n: int, mode: str
) -> tuple[list[float], list[float], list[float]]:
    """Per task: (model start → first chunk read, first delta → first chunk read, round trip)
    in ms; for `burst`, the second list is the time per chunk of the burst."""
    ttft, added, trips = [], [], []
    for _ in range(n):
        task = Task(input=INPUT, run_id=RUN, data={"mode": mode})
        sent = time.monotonic_ns()
        result = await client.run_task(task, capability="stream", timeout=TIMEOUT_S)
        trips.append(ms(time.monotonic_ns() - sent))
        data = result.data
        if mode == "stream":
            await arrivals.until(task.task_id, 1)
            ttft.append(ms(arrivals.first[task.task_id] - data["started"]))
            added.append(ms(arrivals.first[task.task_id] - data["first"]))
        elif mode == "burst":
            await arrivals.until(task.task_id, BURST + 1)  # the ticks and the final
            added.append(ms(arrivals.last[task.task_id] - data["started"]) / (BURST + 1))
    return ttft, added, trips


async def raw_figures(fleet: Fleet, n: int) -> dict[str, list[float]]:
    """Raw nats-py: core and JetStream, one at a time and in bursts, publisher and reader on
    two connections of this process."""
    publisher = await nats.connect(fleet.url)
    js = publisher.jetstream()
    await js.add_stream(StreamConfig(name=RAW_STREAM, subjects=[f"{RAW_SUBJECT}.>"]))
    got: asyncio.Queue[int] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        got.put_nowait(time.monotonic_ns())

    core_sub = await fleet.nc.subscribe(f"{RAW_SUBJECT}.core", cb=on_msg)
    js_sub = await fleet.nc.jetstream().subscribe(
        f"{RAW_SUBJECT}.js", stream=RAW_STREAM, cb=on_msg, ordered_consumer=True
    )
    await fleet.nc.flush()
    payload = b'{"type":"stream_chunk","kind":"delta","text":"what makes a message "}'
    out: dict[str, list[float]] = defaultdict(list)
    try:
        for _ in range(n):
            sent = time.monotonic_ns()
            await publisher.publish(f"{RAW_SUBJECT}.core", payload)
            await publisher.flush()
            out["core"].append(ms(await asyncio.wait_for(got.get(), TIMEOUT_S) - sent))
            sent = time.monotonic_ns()
            await js.publish(f"{RAW_SUBJECT}.js", payload)
            out["js"].append(ms(await asyncio.wait_for(got.get(), TIMEOUT_S) - sent))
        for _ in range(max(1, n // 10)):
            for kind in ("core", "js"):
                sent = time.monotonic_ns()
                for _ in range(BURST):
                    if kind == "core":
                        await publisher.publish(f"{RAW_SUBJECT}.core", payload)
                    else:
                        await js.publish(f"{RAW_SUBJECT}.js", payload)
                await publisher.flush()
                last = 0
                for _ in range(BURST):
                    last = await asyncio.wait_for(got.get(), TIMEOUT_S)
                out[f"{kind} burst"].append(ms(last - sent) / BURST)
    finally:
        await core_sub.unsubscribe()
        await js_sub.unsubscribe()
        await publisher.close()
    return out


async def main(args: argparse.Namespace, workdir: Path) -> None:
    n = 50 if args.smoke else 1000
    warmup = 10 if args.smoke else 100
    alone = await provider_alone(n)
    spec = workdir / "bencher.yaml"
    spec.write_text(SPEC)
    async with running_fleet(workdir, PREFIX) as fleet:
        await fleet.start_coordinator()
        await fleet.add_agents(1, spec)
        client = ChorusClient(fleet.nc, fleet.subjects, timeout=TIMEOUT_S)
        arrivals = Arrivals()
        reader_nc = await nats.connect(fleet.url)
        reader = ChorusClient(reader_nc, fleet.subjects).stream(RUN)
        await reader.open()

        async def read() -> None:
            async for chunk in reader:
                arrivals.add(chunk)

        reading = asyncio.create_task(read())
        try:
            await through_chorus(client, arrivals, warmup, "stream")
            ttft, added, streamed = await through_chorus(client, arrivals, n, "stream")
            _, _, plain = await through_chorus(client, arrivals, n, "complete")
            _, burst, _ = await through_chorus(client, arrivals, max(1, n // 10), "burst")
            raw = await raw_figures(fleet, n)
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            await reader.close()
            await reader_nc.close()

    def row(label: str, values: list[float]) -> list[str]:
        return [label, f"{pct(values, 0.5):.3f}", f"{pct(values, 0.99):.3f}"]

    print(f"# Live output: time to first token and cost per chunk ({n} tasks)\n")
    print(f"{versions_line()}\n")
    print(
        markdown_table(
            ["", "p50 ms", "p99 ms"],
            [
                row("offline provider alone, call → first delta", alone),
                row("through Chorus, model start → reader's first chunk", ttft),
                row("added by Chorus to the first token", added),
                row("raw core publish → subscriber, one at a time", raw["core"]),
                row("raw JetStream publish (acked) → ordered consumer", raw["js"]),
                row(f"chorus, per chunk in a burst of {BURST}", burst),
                row(f"raw core, per message in a burst of {BURST}", raw["core burst"]),
                row(f"raw JetStream (acked), per message in a burst of {BURST}", raw["js burst"]),
                row("task round trip, streamed", streamed),
                row("task round trip, the same call not streamed", plain),
            ],
        )
    )
    p50 = pct(added, 0.5)
    verdict = "within" if p50 <= TARGET_MS else "over"
    print(f"\n- added to the first token p50 {p50:.3f} ms: {verdict} the {TARGET_MS} ms target")
    print(
        f"- per chunk p50 {p50:.3f} ms vs raw JetStream publish → ordered consumer "
        f"{pct(raw['js'], 0.5):.3f} ms and raw core {pct(raw['core'], 0.5):.3f} ms"
    )
    cost = pct(streamed, 0.5) - pct(plain, 0.5)
    print(f"- streaming costs the task's round trip {cost:+.3f} ms p50")


if __name__ == "__main__":
    raise SystemExit(cli.run(main, cli.parser(__name__, __doc__).parse_args(), "streaming-"))
