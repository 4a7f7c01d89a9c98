"""Measured figures: latencies, rates, percentiles and ratios, and the two ways of measuring
them (one request at a time; a fixed number in flight)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from bench.harness.profile import Usage

IN_FLIGHT = 100  # requests outstanding in the throughput phases,
STALL_S = 5.0  # a request this slow waited for a redelivery (the claim timeout is 30 s)

Call = Callable[[], Awaitable[object]]


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile, nearest rank: sorted[min(n - 1, int(q * n))]."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_us(values_ns: Sequence[int]) -> float:
    return sorted(values_ns)[len(values_ns) // 2] / 1000


def spread(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    """`median (min-max)`, or the one value, or `—`."""
    if not values:
        return "—"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x"


@dataclass
class Figure:
    """One measured phase: latencies (ns), a rate, and what it cost (`usage`)."""

    label: str
    latencies: list[int] = field(default_factory=list)
    rate: float | None = None
    clean_rate: float | None = None  # the rate had the stalled requests not stalled
    usage: Usage | None = None
    spread: Counter[str] = field(default_factory=Counter)  # requests answered per instance

    def pct_us(self, q: float) -> float:
        return pct(self.latencies, q) / 1000

    @property
    def p50(self) -> float:
        return self.pct_us(0.5)

    @property
    def p99(self) -> float:
        return self.pct_us(0.99)

    @property
    def mean_rate(self) -> float:
        """Requests per second one at a time: 1 / the mean latency."""
        return 1e9 / statistics.mean(self.latencies)

    @property
    def stalls(self) -> int:
        return sum(1 for x in self.latencies if x > STALL_S * 1e9)

    @property
    def cpu(self) -> dict[str, float]:
        return self.usage.cpu if self.usage else {}

    @property
    def cpu_us_per_request(self) -> float | None:
        """CPU time of every process of the run (not `other`) per request."""
        if self.usage is None or not self.latencies:
            return None
        return self.usage.busy_s * 1e6 / len(self.latencies)

    @property
    def msgs_per_request(self) -> tuple[float, float] | None:
        """Messages into and out of the server per request."""
        if self.usage is None or not self.usage.server or not self.latencies:
            return None
        n = len(self.latencies)
        return self.usage.server["in_msgs"] / n, self.usage.server["out_msgs"] / n

    def line(self) -> str:
        parts = [f"{self.label:48s}"]
        if self.latencies:
            parts.append(
                f"p50 {self.p50:7.0f} us  p99 {self.p99:7.0f} us  max {self.pct_us(1):8.0f} us"
            )
        if self.rate is not None:
            parts.append(f"{self.rate:7.0f} req/s")
        if self.stalls:
            parts.append(
                f"STALLS: {self.stalls} requests over {STALL_S:.0f} s; "
                f"without them {self.clean_rate or 0:.0f} req/s"
            )
        if self.cpu_us_per_request is not None:
            parts.append(f"cpu {self.cpu_us_per_request:5.0f} us/req")
        if self.msgs_per_request is not None:
            parts.append("msgs in/out per req {:.1f}/{:.1f}".format(*self.msgs_per_request))
        if len(self.spread) > 1:
            total = sum(self.spread.values())
            shares = sorted((n / total for n in self.spread.values()), reverse=True)
            parts.append("answered " + "/".join(f"{s:.0%}" for s in shares))
        return "  ".join(parts)


async def sequential(call: Call, n: int) -> list[int]:
    """n calls one after the other; each one's latency in ns."""
    latencies = []
    for _ in range(n):
        started = time.perf_counter_ns()
        await call()
        latencies.append(time.perf_counter_ns() - started)
    return latencies


async def in_flight(call: Call, n: int, figure: Figure, width: int = IN_FLIGHT) -> None:
    """n calls with `width` outstanding (gather + semaphore): the rate,
    and each call's latency from the moment it got its turn."""
    room = asyncio.Semaphore(width)
    finished: list[tuple[int, int]] = []  # (done at, latency)

    async def one() -> None:
        async with room:
            sent = time.perf_counter_ns()
            await call()
            done = time.perf_counter_ns()
            finished.append((done, done - sent))

    started = time.perf_counter_ns()
    await asyncio.gather(*(one() for _ in range(n)))
    figure.latencies = [latency for _, latency in finished]
    figure.rate = n * 1e9 / (time.perf_counter_ns() - started)
    quick = [done for done, latency in finished if latency <= STALL_S * 1e9]
    if quick and len(quick) < n:
        figure.clean_rate = len(quick) * 1e9 / (max(quick) - started)
