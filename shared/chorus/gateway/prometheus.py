"""The Prometheus text exposition format (0.0.4) of the coordinator's metrics and the gateway's.

Written by hand: a handful of gauges and counters built from one `Metrics` reply per scrape
need no client library and no process-global registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Final, Literal

import msgspec

from chorus.gateway.access import RequestCounts
from chorus.messages import AgentMetrics, Metrics

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


class Family(msgspec.Struct, frozen=True):
    """One metric: its HELP and TYPE lines and its samples."""

    name: str
    kind: Literal["gauge", "counter"]
    help: str
    samples: Sequence[tuple[Labels, float]] = ()


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def render(families: Iterable[Family]) -> str:
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in family.samples:
            pairs = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            series = f"{family.name}{{{pairs}}}" if pairs else family.name
            lines.append(f"{series} {format_value(value)}")
    return "\n".join(lines) + "\n"


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


def _one(name: str, kind: Literal["gauge", "counter"], help: str, value: float) -> Family:
    return Family(name, kind, help, [((), value)])


def system_families(metrics: Metrics) -> list[Family]:
    """The coordinator's view: registry totals, queue, task counters, one series per agent."""
    families = [
        _one("chorus_agents", "gauge", "Agent instances in the registry.", metrics.total_agents),
        _one("chorus_agents_healthy", "gauge", "Healthy agent instances.", metrics.healthy_agents),
        _one(
            "chorus_queue_length",
            "gauge",
            "Durable tasks waiting for an agent instance.",
            metrics.queue_length,
        ),
        _one("chorus_active_jobs", "gauge", "Durable tasks being worked on.", metrics.active_jobs),
        _one(
            "chorus_current_load",
            "gauge",
            "Tasks in flight over the capacity of live instances (0 to 1).",
            metrics.current_load,
        ),
        _one(
            "chorus_tasks_completed_total",
            "counter",
            "Durable tasks completed since the coordinator started.",
            metrics.completed_tasks,
        ),
        _one(
            "chorus_tasks_failed_total",
            "counter",
            "Durable tasks that failed every attempt since the coordinator started.",
            metrics.failed_tasks,
        ),
        _one(
            "chorus_tasks_retried_total",
            "counter",
            "Retried attempts of durable tasks since the coordinator started.",
            metrics.retried_tasks,
        ),
        _one(
            "chorus_tasks_dead_lettered_total",
            "counter",
            "Durable tasks sent to the dead-letter stream since the coordinator started.",
            metrics.dead_lettered,
        ),
    ]
    for name, help, value in PER_AGENT:
        samples = [
            ((("instance", a.instance), ("agent", a.name)), value(a)) for a in metrics.agents
        ]
        families.append(Family(name, "gauge", help, samples))
    return families


def gateway_families(
    counts: RequestCounts, *, coordinator_up: bool, nats_connected: bool
) -> list[Family]:
    """What the gateway knows by itself, whether or not the coordinator answers."""
    return [
        _one(
            "chorus_coordinator_up",
            "gauge",
            "1 when a coordinator answered the gateway's metrics request.",
            1 if coordinator_up else 0,
        ),
        _one(
            "chorus_gateway_nats_connected",
            "gauge",
            "1 while the gateway is connected to NATS.",
            1 if nats_connected else 0,
        ),
        Family(
            "chorus_http_requests_total",
            "counter",
            "HTTP requests the gateway answered, by route template, method and status.",
            [
                ((("route", route), ("method", method), ("status", status)), count)
                for (route, method, status), count in counts.items()
            ],
        ),
    ]
