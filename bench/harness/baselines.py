"""Raw nats-py figures, measured in the same run as the Chorus figures they are compared
with, on the same server and with a payload of the same ~1 KB:

- cross-process core request-reply: this process requests, a tiny nats-py responder process
  (a queue-group subscriber that answers at once) replies; one at a time, and with
  `IN_FLIGHT` outstanding;
- the JetStream work-queue round trip: publish a task to a work-queue stream, a pull worker
  (in this process) fetches up to 10, acks each and sends a core reply to the requester's
  inbox; one at a time, and with `IN_FLIGHT` outstanding.

Each phase is `metered`: the CPU of every process of the fleet and the server's counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from nats.aio.msg import Msg

from bench.harness.fleet import Fleet
from bench.harness.profile import metered
from bench.harness.stats import IN_FLIGHT, Figure, in_flight, sequential

TIMEOUT_S = 30.0
RAW_SUBJECT = "benchraw.xecho"
WORK_STREAM = "BENCHRAW_WORK"
WORK_SUBJECT = "benchraw.work.task"

# The ~1 KB task: what a researcher agent is asked.
INSTRUCTIONS = "Research the topic." * 5
INPUT = "x" * 880

RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def handler(msg):
        await msg.respond(b'{"output":"ok"}')
    await nc.subscribe(sys.argv[2], queue="q", cb=handler)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def plain_payload() -> bytes:
    """The task as plain JSON (id, agent, instructions, input): no Chorus encoding."""
    task = {"id": "t-0001", "agent": "researcher", "instructions": INSTRUCTIONS, "input": INPUT}
    return json.dumps(task).encode()


@contextlib.asynccontextmanager
async def responder(fleet: Fleet, log: Path | None = None) -> AsyncIterator[None]:
    """The raw nats-py responder process on RAW_SUBJECT for the block (role `responder`)."""
    sink = log.open("wb") if log else None
    try:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-c", RESPONDER, fleet.url, RAW_SUBJECT),
            stdout=asyncio.subprocess.PIPE,
            stderr=sink,
        )
    finally:
        if sink:
            sink.close()
    try:
        assert process.stdout is not None
        await asyncio.wait_for(process.stdout.readline(), TIMEOUT_S)
        fleet.add("responder", process.pid)
        yield
    finally:
        fleet.pids.pop("responder", None)
        process.terminate()
        await process.wait()


async def request_reply(
    fleet: Fleet, payload: bytes, *, warmup: int, sequential_n: int, in_flight_n: int
) -> tuple[Figure, Figure]:
    """Cross-process core request-reply: sequential, then IN_FLIGHT outstanding."""

    async def call() -> Msg:
        return await fleet.nc.request(RAW_SUBJECT, payload, timeout=10)

    async with responder(fleet, fleet.workdir / "responder.log"):
        for _ in range(warmup):
            await call()
        seq = Figure("raw cross-process request-reply, sequential")
        async with metered(fleet) as seq.usage:
            seq.latencies = await sequential(call, sequential_n)
        pipe = Figure(f"raw cross-process request-reply, {IN_FLIGHT} in flight")
        async with metered(fleet) as pipe.usage:
            await in_flight(call, in_flight_n, pipe)
    return seq, pipe


async def work_queue(
    fleet: Fleet, payload: bytes, *, warmup: int, sequential_n: int, in_flight_n: int = 0
) -> tuple[Figure, Figure | None]:
    """Publish -> pull fetch (up to 10) -> ack -> core reply -> requester: sequential, then
    IN_FLIGHT outstanding (skipped when `in_flight_n` is 0)."""
    nc = fleet.nc
    js = nc.jetstream()
    await js.add_stream(name=WORK_STREAM, subjects=[WORK_SUBJECT], retention="workqueue")
    psub = await js.pull_subscribe(WORK_SUBJECT, durable="workers", stream=WORK_STREAM)
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            try:
                msgs = await psub.fetch(10, timeout=0.5)
            except TimeoutError:  # nats-py raises its own subclass, or asyncio's at times
                continue
            for m in msgs:
                await m.ack()
                assert m.headers is not None
                await nc.publish(m.headers["Reply-To"], b'{"output":"ok"}')

    work = asyncio.create_task(worker())
    inbox = nc.new_inbox()
    waiting: dict[str, asyncio.Future[int]] = {}

    async def on_result(msg: Msg) -> None:
        waiting.pop(msg.subject).set_result(time.perf_counter_ns())

    sub = await nc.subscribe(inbox + ".*", cb=on_result)
    sent = itertools.count()

    async def call() -> int:
        subject = f"{inbox}.{next(sent)}"
        arrived: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiting[subject] = arrived
        started = time.perf_counter_ns()
        await js.publish(WORK_SUBJECT, payload, headers={"Reply-To": subject})
        return await asyncio.wait_for(arrived, 5) - started

    seq = Figure("raw JetStream work-queue round trip, sequential")
    pipe = None
    try:
        for _ in range(warmup):
            await call()
        async with metered(fleet) as seq.usage:
            for _ in range(sequential_n):
                seq.latencies.append(await call())
        if in_flight_n:
            pipe = Figure(f"raw JetStream work-queue round trip, {IN_FLIGHT} in flight")
            async with metered(fleet) as pipe.usage:
                await in_flight(call, in_flight_n, pipe)
    finally:
        stop.set()
        await work
        await sub.unsubscribe()
        await psub.unsubscribe()
        await js.delete_stream(WORK_STREAM)
    return seq, pipe
