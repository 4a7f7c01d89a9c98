"""The gateway's `/metrics`: its own instruments, and the whole system as the coordinator sees it.

Built with `prometheus_client`: the coordinator's `Metrics` reply becomes gauges and counters
(`SystemCollector`, the same series as before this module used the library), and the families
the reply relays (histograms of queue wait and dispatch, token, retry and dead-letter
counters) are collected again as they came. What the gateway knows by itself (`GatewayState`,
its HTTP requests) is there whether or not a coordinator answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chorus.messages import AgentMetrics, Metrics
from chorus.telemetry.metrics import CONTENT_TYPE, GatewayInstruments, Relayed, render

__all__ = ["CONTENT_TYPE", "GatewayState", "SystemCollector", "exposition"]

# Gauges with one sample per agent instance, labelled `instance` and `agent`.
PER_AGENT: Final[tuple[tuple[str, str, Callable[[AgentMetrics], float]], ...]] = (
    ("chorus_agent_load", "Tasks in flight in the instance.", lambda a: a.load),
    (
        "chorus_agent_max_concurrency",
        "Most tasks the instance runs at once.",
        lambda a: a.max_concurrency,
    ),
    (
        "chorus_agent_success_rate",
        "Share of the instance's tasks that succeeded (0 to 1).",
        lambda a: a.success_rate,
    ),
    (
        "chorus_agent_mean_latency_ms",
        "Mean task latency of the instance, milliseconds.",
        lambda a: a.mean_latency_ms,
    ),
    (
        "chorus_agent_healthy",
        "1 when the instance is healthy, else 0.",
        lambda a: 1 if a.health == "healthy" else 0,
    ),
)


class SystemCollector(Collector):
    """The coordinator's view, from one Metrics reply: registry totals, queue, task counters,
    one series per agent instance."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self.metrics
        yield GaugeMetricFamily("chorus_agents", "Agent instances in the registry.", m.total_agents)
        yield GaugeMetricFamily(
            "chorus_agents_healthy", "Healthy agent instances.", m.healthy_agents
        )
        yield GaugeMetricFamily(
            "chorus_queue_length", "Durable tasks waiting for an agent instance.", m.queue_length
        )
        yield GaugeMetricFamily(
            "chorus_active_jobs", "Durable tasks being worked on.", m.active_jobs
        )
        yield GaugeMetricFamily(
            "chorus_current_load",
            "Tasks in flight over the capacity of live instances (0 to 1).",
            m.current_load,
        )
        for name, help, value in (
            ("completed", "Durable tasks completed", m.completed_tasks),
            ("failed", "Durable tasks that failed every attempt", m.failed_tasks),
            ("retried", "Retried attempts of durable tasks", m.retried_tasks),
            ("dead_lettered", "Durable tasks sent to the dead-letter stream", m.dead_lettered),
        ):
            yield CounterMetricFamily(
                f"chorus_tasks_{name}", f"{help} since the coordinator started.", value
            )
        for name, help, read in PER_AGENT:
            family = GaugeMetricFamily(name, help, labels=["instance", "agent"])
            for agent in m.agents:
                family.add_metric([agent.instance, agent.name], read(agent))
            yield family


class GatewayState(Collector):
    """What the gateway knows by itself: whether the coordinator answered, whether NATS is up."""

    def __init__(self, *, coordinator_up: bool, nats_connected: bool) -> None:
        self.coordinator_up = coordinator_up
        self.nats_connected = nats_connected

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "chorus_coordinator_up",
            "1 when a coordinator answered the gateway's metrics request.",
            1 if self.coordinator_up else 0,
        )
        yield GaugeMetricFamily(
            "chorus_gateway_nats_connected",
            "1 while the gateway is connected to NATS.",
            1 if self.nats_connected else 0,
        )


def exposition(
    instruments: GatewayInstruments, metrics: Metrics | None, *, nats_connected: bool
) -> bytes:
    """The text of one scrape: the gateway's own series, then the coordinator's (if any)."""
    collectors: list[Collector] = [
        GatewayState(coordinator_up=metrics is not None, nats_connected=nats_connected),
        instruments.registry,
    ]
    if metrics is not None:
        collectors += [SystemCollector(metrics), Relayed(metrics.families)]
    return render(*collectors)
