"""Increments per second on one hot key: SharedState.update against a raw nats-py CAS loop.

N writers, each on its own connection, add 1 to the same key M times, on an embedded
nats-server with file storage. Both runs must end at exactly N x M.

    python -m bench.kv_contention                  # 4 writers x 500
    python -m bench.kv_contention --writers 8 --increments 1000
    python -m bench.kv_contention --smoke          # 2 writers x 20, under a second
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from bench.harness import cli
from chorus.nats.server import NatsServer
from chorus.state import SharedState
from chorus.subjects import Subjects

KEY = "counter"


@dataclass
class Outcome:
    name: str
    seconds: float
    total: int
    conflicts: int

    @property
    def rate(self) -> float:
        return self.total / self.seconds


async def shared_state_writer(nc: Client, subjects: Subjects, writer: str, m: int) -> int:
    state = await SharedState(nc, subjects, writer).open()
    for _ in range(m):
        await state.update(KEY, lambda n: n + 1, default=0)
    return state.stats.conflicts


async def raw_cas_writer(kv: KeyValue, m: int) -> int:
    """The loop one writes by hand with nats-py: get, then update(last=) or create."""
    conflicts = 0
    for _ in range(m):
        while True:
            try:
                entry = await kv.get(KEY)
                revision, value = entry.revision or 0, int(entry.value or b"0")
            except KeyNotFoundError:
                revision, value = 0, 0
            payload = str(value + 1).encode()
            try:
                if revision:
                    await kv.update(KEY, payload, last=revision)
                else:
                    await kv.create(KEY, payload)
                break
            except KeyWrongLastSequenceError:
                conflicts += 1
    return conflicts


async def run(n: int, writer: Callable[[int], Awaitable[int]]) -> tuple[float, int]:
    """Run writers 0..n-1 at once; return the seconds taken and the conflicts met."""
    started = time.perf_counter()
    conflicts = await asyncio.wait_for(asyncio.gather(*(writer(i) for i in range(n))), 600)
    return time.perf_counter() - started, sum(conflicts)


async def bench(url: str, n: int, m: int) -> list[Outcome]:
    connections = [await nats.connect(url, name=f"bench-{i}") for i in range(n)]
    try:
        outcomes = []

        chorus_subjects = Subjects("benchstate")
        seconds, conflicts = await run(
            n, lambda i: shared_state_writer(connections[i], chorus_subjects, f"w{i}", m)
        )
        check = await SharedState(connections[0], chorus_subjects, "check").open()
        got = await check.get(KEY)
        assert got is not None and got.value == n * m, f"lost writes: {got}"
        outcomes.append(Outcome("SharedState.update", seconds, n * m, conflicts))

        raw_bucket = Subjects("benchraw").state_bucket
        config = KeyValueConfig(
            bucket=raw_bucket, history=16, storage=StorageType.FILE, direct=True
        )
        await connections[0].jetstream().create_key_value(config)
        kvs = [await c.jetstream().key_value(raw_bucket) for c in connections]
        seconds, conflicts = await run(n, lambda i: raw_cas_writer(kvs[i], m))
        final = int((await kvs[0].get(KEY)).value or b"0")
        assert final == n * m, f"lost writes: {final}"
        outcomes.append(Outcome("raw kv.update CAS", seconds, n * m, conflicts))
        return outcomes
    finally:
        for c in connections:
            await c.close()


async def main_async(args: argparse.Namespace, workdir: Path) -> None:
    n, m = (2, 20) if args.smoke else (args.writers, args.increments)
    with NatsServer(workdir / "jetstream") as server:
        outcomes = await bench(server.url, n, m)

    print(f"{n} writers x {m} increments on one key ({n * m} in all), embedded nats-server")
    for o in outcomes:
        print(
            f"  {o.name:<20} {o.rate:8.0f} increments/s  {o.seconds:6.2f} s  "
            f"{o.conflicts:6d} conflicts (retried)"
        )
    ratio = outcomes[0].rate / outcomes[1].rate
    print(f"  SharedState / raw    {ratio:8.2f}x")


def main() -> int:
    parser = cli.parser("bench.kv_contention", __doc__)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--increments", type=int, default=500, help="per writer")
    return cli.run(main_async, parser.parse_args(), "chorus-kv-")


if __name__ == "__main__":
    raise SystemExit(main())
