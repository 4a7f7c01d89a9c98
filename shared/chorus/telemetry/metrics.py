"""Prometheus metrics with `prometheus_client`: each role's instruments, in a registry of its own.

Every instrument set takes the `CollectorRegistry` to register in (a new one by default), so
several roles in one process (tests, `chorus up` in one piece) never share series, and nothing
lands in the library's global default registry. A process exposes its registry on
`CHORUS_METRICS_PORT` with `MetricsServer`. The coordinator also sends a snapshot of its
registry in its `Metrics` reply (`snapshot`), which the gateway's `/metrics` shows again
(`Relayed`), so one scrape of the gateway sees the whole system.

Names: `chorus_*_seconds` histograms, `chorus_*_total` counters; labels are agents, models,
tools, targets and workflows, never task or run ids.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from chorus.messages import MetricFamily, MetricSample, Result, TaskOutcome, ToolCallRecord, Usage

log = logging.getLogger("chorus.telemetry.metrics")

T = TypeVar("T")

# The text format every scraper reads; our names need none of 1.0.0's UTF-8 escaping.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
# Seconds, from a quick tool call to a long agent task.
LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip


def _tokens(counter: Counter, agent: str, model: str, usage: Usage) -> None:
    if usage.input_tokens:
        counter.labels(agent, model, "input").inc(usage.input_tokens)
    if usage.output_tokens:
        counter.labels(agent, model, "output").inc(usage.output_tokens)


class AgentInstruments:
    """What an agent instance measures: its handlers, its model calls, its tool calls."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.handled = Histogram(
            "chorus_agent_handle_duration_seconds",
            "Time an instance took to handle a task, help request or event, by outcome.",
            ["agent", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_seconds = Histogram(
            "chorus_model_duration_seconds",
            "Duration of one model call.",
            ["agent", "model", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token_seconds = Histogram(
            "chorus_model_time_to_first_token_seconds",
            "Time from sending a streamed model call to its first output token.",
            ["agent", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "chorus_model_tokens",
            "Tokens of model calls, by type (input or output).",
            ["agent", "model", "type"],
            registry=r,
        )
        self.tool_calls = Counter(
            "chorus_tool_calls",
            "Tool calls the model asked for, by outcome (ok or error).",
            ["agent", "tool", "outcome"],
            registry=r,
        )
        self.tool_seconds = Histogram(
            "chorus_tool_duration_seconds",
            "Duration of one tool call.",
            ["agent", "tool"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "chorus_agent_in_flight", "Handlers running in the instance.", registry=r
        )
        self.waiting = Gauge(
            "chorus_agent_waiting", "Handlers waiting for a free slot.", registry=r
        )

    def follow(self, in_flight: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Read the in-flight and waiting gauges from the instance's own counts at scrape."""
        self.in_flight.set_function(in_flight)
        self.waiting.set_function(waiting)

    def handle_done(self, agent: str, seconds: float, *, ok: bool) -> None:
        self.handled.labels(agent, "ok" if ok else "error").observe(seconds)

    def model_done(
        self, agent: str, model: str, seconds: float, usage: Usage | None = None
    ) -> None:
        """One model call: its duration and, when it answered, its tokens."""
        self.model_seconds.labels(agent, model, "ok" if usage is not None else "error").observe(
            seconds
        )
        if usage is not None:
            _tokens(self.tokens, agent, model, usage)

    def first_token(self, agent: str, model: str, seconds: float) -> None:
        """The hook for streamed calls: time to the first token."""
        self.first_token_seconds.labels(agent, model).observe(seconds)

    def tools_done(self, agent: str, records: Iterable[ToolCallRecord]) -> None:
        for record in records:
            self.tool_calls.labels(agent, record.name, "error" if record.error else "ok").inc()
            self.tool_seconds.labels(agent, record.name).observe(record.duration_ms / 1000)


class DispatchInstruments:
    """What the coordinator measures of durable tasks: queue wait, attempts, outcomes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.queue_wait = Histogram(
            "chorus_queue_wait_seconds",
            "Time a durable task waited in the queue before it was first sent to an instance.",
            ["target"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.attempt_seconds = Histogram(
            "chorus_dispatch_duration_seconds",
            "One attempt of a durable task, from sending it to an instance to its answer, by "
            "outcome (completed, error, lost).",
            ["target", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "chorus_task_tokens",
            "Tokens reported by completed durable tasks, by agent, model and type.",
            ["agent", "model", "type"],
            registry=r,
        )
        self.retries = Counter(
            "chorus_dispatch_retries", "Attempts of durable tasks that will be retried.",
            ["target"], registry=r,
        )  # fmt: skip
        self.dead_letters = Counter(
            "chorus_dead_letters", "Durable tasks sent to the dead-letter stream.",
            ["target"], registry=r,
        )  # fmt: skip

    async def timed(self, target: str, attempt: Awaitable[T]) -> T:
        """Await one attempt (a Result or an ErrorReply, or an exception: the instance was
        lost) and observe its duration by outcome."""
        clock = _Clock()
        outcome = "lost"
        try:
            answer = await attempt
            outcome = "completed" if isinstance(answer, Result) else "error"
            return answer
        finally:
            self.attempt_seconds.labels(target, outcome).observe(clock.seconds())

    def recorded(self, outcome: TaskOutcome) -> None:
        result = outcome.result
        if outcome.status == "completed" and result is not None:
            _tokens(self.tokens, result.agent, result.model or "unknown", result.usage)


class RunInstruments:
    """What an orchestrator measures: how long runs take, by workflow and final status."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.run_seconds = Histogram(
            "chorus_run_duration_seconds",
            "Duration of a workflow run in this orchestrator, by workflow and status.",
            ["workflow", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )


class GatewayInstruments:
    """The gateway's HTTP requests: counted by route template, method and status, and timed.

    Labelled by the route's template (`/api/runs/{run_id}`), never the raw path, so the
    number of series stays bounded whatever clients ask for.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "chorus_http_requests",
            "HTTP requests the gateway answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "chorus_http_request_duration_seconds",
            "Time the gateway took to answer, by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def add(self, route: str, method: str, status: int, seconds: float = 0.0) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.seconds.labels(route, method).observe(seconds)


class _Clock:
    def __init__(self) -> None:
        self._started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self._started


# snapshots: a registry's families as messages, and back


def snapshot(registry: CollectorRegistry) -> list[MetricFamily]:
    """Every family of `registry` as typed messages (for the coordinator's Metrics reply)."""
    return [
        MetricFamily(
            name=family.name,
            type=family.type,
            help=family.documentation,
            samples=[MetricSample(s.name, dict(s.labels), s.value) for s in family.samples],
        )
        for family in registry.collect()
    ]


class Relayed(Collector):
    """Families received in a snapshot, collected again as they were."""

    def __init__(self, families: Sequence[MetricFamily]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        for family in self.families:
            metric = Metric(family.name, family.help, family.type)
            for sample in family.samples:
                metric.add_sample(sample.name, sample.labels, sample.value)
            yield metric


def render(*collectors: Collector) -> bytes:
    """The text exposition of several collectors (registries are collectors too)."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry)


class MetricsServer:
    """`/metrics` of one registry on a port of its own (prometheus_client's HTTP server, in a
    thread). Port 0 in `start` means off; a port in use fails at start."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_port if self._server is not None else 0

    def start(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        if port:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
            log.info("metrics served", extra={"host": host, "port": self.port})
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = None
