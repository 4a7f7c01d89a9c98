"""Registry readers (`chorus agents`, the gateway's health) judge each entry by the age of its
last heartbeat: an entry nobody keeps fresh (an earlier `chorus up`'s) is never healthy."""

from __future__ import annotations

import itertools
import json
import time

from nats.aio.client import Client

from chorus.agent import Agent
from chorus.client.system import REGISTRY_LAG_INTERVALS, SystemClient
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.gateway.system import SystemView
from chorus.messages import AgentRecord, decode, encode
from chorus.nats.streams import ensure_agents_bucket
from tests.cli import achorus
from tests.coordination import wait_for_record
from tests.helpers import StartHost


def entry(instance: str, *, last_seen: float, interval_s: float = 2.0) -> AgentRecord:
    """An entry as a coordinator writes it for a healthy instance."""
    return AgentRecord(
        instance=instance,
        name=instance.rsplit("-", 1)[0],
        capabilities=["work"],
        health="healthy",
        state="ready",
        in_flight=0,
        max_concurrency=4,
        processed=3,
        failed=0,
        success_rate=1.0,
        mean_latency_ms=5.0,
        last_seen=last_seen,
        started_at=last_seen - 600,
        interval_s=interval_s,
    )


async def put(nc: Client, settings: Settings, *records: AgentRecord) -> None:
    agents = await ensure_agents_bucket(nc.jetstream(), settings.subjects)
    for record in records:
        await agents.put(record.instance, encode(record))


async def test_entries_of_a_previous_run_are_not_healthy_with_no_coordinator(
    nc: Client, settings: Settings
) -> None:
    now = time.time()
    # The previous `chorus up`, killed 20 s ago (10 intervals), and one beat 1 s ago.
    await put(
        nc,
        settings,
        entry("worker-ghost", last_seen=now - 20),
        entry("worker-old", last_seen=now - 120),
        entry("worker-fresh", last_seen=now - 1),
    )

    listed = {r.instance: r.health for r in await SystemClient(nc, settings.subjects).agents()}
    report = await SystemView(nc, settings.subjects, timeout=0.2).health()

    assert listed == {"worker-fresh": "healthy", "worker-ghost": "unhealthy", "worker-old": "dead"}
    assert report.healthy_agents == 1
    assert report.status == "degraded"  # no coordinator answers


async def test_an_entry_is_judged_by_its_own_heartbeat_interval(
    nc: Client, settings: Settings
) -> None:
    now = time.time()
    await put(nc, settings, entry("slow-a", last_seen=now - 20, interval_s=30.0))

    [record] = await SystemClient(nc, settings.subjects).agents()

    assert record.health == "healthy"  # 20 s is less than one of its 30 s intervals


async def test_agents_shows_last_seen_from_heartbeats_not_the_registry_write(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    host = await start_host(Agent(name="worker", capabilities=["work"]))
    # Its entry as an earlier coordinator left it, half a minute ago; no coordinator now.
    await put(nc, settings, entry(host.instance, last_seen=time.time() - 30, interval_s=0.2))
    before = time.time()

    result = await achorus(settings, "agents", "--json")

    assert result.returncode == 0, result.stderr
    [shown] = json.loads(result.stdout)
    assert shown["last_seen"] >= before - 2 * settings.heartbeat_interval
    assert shown["health"] == "healthy"  # it beats: alive, as the coordinator last said


async def test_the_coordinator_keeps_a_live_entrys_last_seen_within_a_few_intervals(
    coordinator: Coordinator, start_host: StartHost, nc: Client, settings: Settings
) -> None:
    host = await start_host(Agent(name="worker", capabilities=["work"]))
    interval = settings.heartbeat_interval
    writes: list[AgentRecord] = []

    def covers_ten_intervals(record: AgentRecord | None) -> bool:
        if record is not None:
            writes.append(record)
        return len(writes) > 1 and writes[-1].last_seen - writes[0].last_seen > 10 * interval

    await wait_for_record(nc, settings, host.instance, covers_ten_intervals, timeout=15)

    gaps = [b.last_seen - a.last_seen for a, b in itertools.pairwise(writes)]
    assert max(gaps) <= (REGISTRY_LAG_INTERVALS + 2) * interval, gaps
    assert all(w.health == "healthy" and w.interval_s == interval for w in writes)
    agents = await ensure_agents_bucket(nc.jetstream(), settings.subjects)
    stored = decode((await agents.get(host.instance)).value or b"", AgentRecord)
    assert stored.health == "healthy"
