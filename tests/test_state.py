"""Shared state on a real nats-server: values, contention, watches, history, locks as leases."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.config import Settings
from chorus.errors import InvalidKey, LeaseLost, LockTimeout
from chorus.nats.connection import connect
from chorus.state import SharedState, StateValue
from tests.helpers import child_env

WAIT = 10.0  # upper bound for anything awaited; tests finish far sooner


@pytest.fixture
async def state(nc: Client, settings: Settings) -> AsyncIterator[SharedState]:
    async with SharedState(nc, settings.subjects, "alice") as opened:
        yield opened


@pytest.fixture
async def other(nc: Client, settings: Settings) -> AsyncIterator[SharedState]:
    """A second writer on the same connection: only the writer id tells them apart."""
    async with SharedState(nc, settings.subjects, "bob") as opened:
        yield opened


async def test_value_round_trips_with_its_revision_and_writer(state: SharedState) -> None:
    revision = await state.put("plan.current", {"steps": ["research", "write"], "done": 0})

    got = await state.get("plan.current")

    assert got is not None
    assert got.value == {"steps": ["research", "write"], "done": 0}
    assert got.revision == revision
    assert got.writer == "alice"
    assert got.time == pytest.approx(time.time(), abs=5)


async def test_deleted_key_reads_as_absent(state: SharedState) -> None:
    await state.put("draft", "text")

    await state.delete("draft")

    assert await state.get("draft") is None
    assert await state.get("never-written") is None


async def test_history_lists_every_revision_in_order(
    state: SharedState, other: SharedState
) -> None:
    await state.put("status", "planned")
    await other.put("status", "running")
    await state.delete("status")
    await other.put("status", "done")

    history = await state.history("status")

    assert [(h.value, h.writer, h.operation) for h in history] == [
        ("planned", "alice", "put"),
        ("running", "bob", "put"),
        (None, "alice", "delete"),
        ("done", "bob", "put"),
    ]
    assert [h.revision for h in history] == sorted(h.revision for h in history)


async def test_update_applies_the_function_to_the_current_value(state: SharedState) -> None:
    first = await state.update("visits", lambda n: n + 1, default=0)
    second = await state.update("visits", lambda n: n + 1, default=0)

    assert (first.value, second.value) == (1, 2)
    assert second.revision > first.revision
    got = await state.get("visits")
    assert got is not None and got.value == 2


async def test_concurrent_increments_from_four_processes_lose_no_write(
    settings: Settings, state: SharedState
) -> None:
    writers, increments = 4, 500
    connections = [await connect(settings, f"writer-{i}") for i in range(writers)]
    try:
        states = [
            await SharedState(c, settings.subjects, f"writer-{i}").open()
            for i, c in enumerate(connections)
        ]

        async def increment(shared: SharedState) -> None:
            for _ in range(increments):
                await shared.update("counter", lambda n: n + 1, default=0)

        await asyncio.wait_for(asyncio.gather(*(increment(s) for s in states)), 60)
    finally:
        for c in connections:
            await c.close()

    got = await state.get("counter")
    assert got is not None and got.value == writers * increments
    assert sum(s.stats.conflicts for s in states) > 0  # the writers really did collide


async def test_bucket_made_by_another_kv_client_is_adopted(nc: Client, settings: Settings) -> None:
    js = nc.jetstream()
    kv = await js.create_key_value(bucket=settings.subjects.state_bucket, history=1)
    await kv.put("greeting", b"hello")  # no Chorus envelope

    async with SharedState(nc, settings.subjects, "alice") as shared:
        got = await shared.get("greeting")
        lease = await shared.acquire("after-adoption", ttl=5, timeout=0)

    assert got is not None and (got.value, got.writer) == ("hello", "")
    assert lease.token > got.revision


async def test_invalid_key_is_refused_naming_the_key(state: SharedState) -> None:
    for key in ("orders:1", ".hidden", "trailing.", "a..b", "with space", ""):
        with pytest.raises(InvalidKey, match="is not a valid key"):
            await state.put(key, 1)
    with pytest.raises(InvalidKey, match="'orders:1'"):
        await state.get("orders:1")


async def test_lock_keys_cannot_be_written_as_state(state: SharedState) -> None:
    with pytest.raises(InvalidKey, match="reserved for lock leases"):
        await state.put("_lock.jobs", "mine")


async def test_watch_reports_other_writers_changes_including_deletes(
    state: SharedState, other: SharedState
) -> None:
    async with await state.watch("task.>") as watch:
        await state.put("task.1", "mine")  # our own write: not reported
        await other.put("task.1", "theirs")
        await state.delete("task.1")  # ours again
        await other.delete("task.1")

        changes = [await watch.next(WAIT), await watch.next(WAIT)]

    assert [(c.key, c.value, c.writer, c.operation) for c in changes] == [
        ("task.1", "theirs", "bob", "put"),
        ("task.1", None, "bob", "delete"),
    ]


async def test_watch_callback_is_called_for_others_writes_only(
    state: SharedState, other: SharedState
) -> None:
    seen: list[StateValue] = []
    done = asyncio.Event()

    async def on_change(change: StateValue) -> None:
        seen.append(change)
        if change.value == "last":
            done.set()

    watch = await state.watch("flag", on_change)
    await state.put("flag", "ours")
    await other.put("flag", "first")
    await other.put("flag", "last")
    await asyncio.wait_for(done.wait(), WAIT)
    await watch.close()

    assert [c.value for c in seen] == ["first", "last"]


async def test_pattern_watch_reports_only_matching_keys(
    state: SharedState, other: SharedState
) -> None:
    async with await state.watch("orders.*") as watch:
        await other.put("users.7", "no")
        await other.put("orders.7.lines", "no: '*' is one part")
        await other.put("orders.7", "yes")

        change = await watch.next(WAIT)

    assert (change.key, change.value) == ("orders.7", "yes")


async def test_watch_starts_with_new_changes_unless_current_values_are_asked_for(
    state: SharedState, other: SharedState
) -> None:
    await other.put("cfg.model", "small")
    await state.put("cfg.temperature", 0.2)
    await other.put("cfg.gone", 1)
    await other.delete("cfg.gone")

    async with (
        await state.watch("cfg.*") as new_only,
        await state.watch("cfg.*", include_current=True) as with_current,
    ):
        await other.put("cfg.model", "large")

        assert (await new_only.next(WAIT)).value == "large"
        current = [await with_current.next(WAIT) for _ in range(3)]

    assert [(c.key, c.value) for c in current] == [
        ("cfg.model", "small"),
        ("cfg.temperature", 0.2),  # our own, but a current value, not a change
        ("cfg.model", "large"),
    ]


async def test_watch_of_every_key_leaves_out_lock_traffic(
    state: SharedState, other: SharedState
) -> None:
    async with await state.watch(">") as watch:
        await other.release(await other.acquire("side-job", ttl=5))
        await other.put("k", 1)

        change = await watch.next(WAIT)

    assert (change.key, change.value) == ("k", 1)


async def test_closed_watch_ends_its_iteration(state: SharedState, other: SharedState) -> None:
    watch = await state.watch(">")
    received: list[StateValue] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for change in watch:
            received.append(change)
            first.set()

    consumer = asyncio.create_task(consume())
    await other.put("k", 1)
    await asyncio.wait_for(first.wait(), WAIT)

    await watch.close()

    await asyncio.wait_for(consumer, WAIT)  # the loop ended by itself
    assert [c.value for c in received] == [1]


# locks


async def test_held_lock_cannot_be_taken_and_says_who_holds_it(
    state: SharedState, other: SharedState
) -> None:
    lease = await state.acquire("report", ttl=5)

    assert await other.try_acquire("report") is None
    with pytest.raises(LockTimeout, match="'report' is held by 'alice'"):
        await other.acquire("report", timeout=0)

    await state.release(lease)
    taken = await other.try_acquire("report")
    assert taken is not None and taken.token > lease.token


async def test_waiter_gets_the_lock_as_soon_as_it_is_released(
    state: SharedState, other: SharedState, nc: Client, settings: Settings
) -> None:
    lease = await state.acquire("deploy", ttl=30)
    watching = asyncio.Event()

    async def on_consumer_created(msg: Msg) -> None:
        watching.set()

    # The waiter's watch of the lock key shows up as a consumer on the bucket's stream.
    advisory = await nc.subscribe(
        f"$JS.EVENT.ADVISORY.CONSUMER.CREATED.{settings.subjects.state_stream}.>",
        cb=on_consumer_created,
    )
    waiter = asyncio.create_task(other.acquire("deploy", ttl=30, timeout=WAIT))
    await asyncio.wait_for(watching.wait(), WAIT)
    await advisory.unsubscribe()
    released_at = time.monotonic()
    await state.release(lease)

    taken = await asyncio.wait_for(waiter, WAIT)

    assert taken.holder == "bob"
    assert time.monotonic() - released_at < 2  # woken by the release, not the 30 s TTL


async def test_waiting_for_a_held_lock_times_out_with_a_clear_error(
    state: SharedState, other: SharedState
) -> None:
    await state.acquire("migration", ttl=30)

    with pytest.raises(LockTimeout, match=r"'migration' is still held by 'alice'.* 0\.3s"):
        await other.acquire("migration", timeout=0.3)


HOLDER = """
import asyncio
from chorus.config import Settings
from chorus.nats.connection import connect
from chorus.state import SharedState

async def main():
    settings = Settings.from_env()
    nc = await connect(settings, "lock-holder")
    state = await SharedState(nc, settings.subjects, "doomed-holder").open()
    async with state.lock("nightly-job", ttl=2) as lease:
        print(lease.token, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def lock_holder_process(settings: Settings) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        env=child_env(settings),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_lock_of_a_killed_holder_frees_itself_after_its_ttl(
    state: SharedState, settings: Settings
) -> None:
    async with lock_holder_process(settings) as holder:
        assert holder.stdout is not None
        holder_token = int(await asyncio.wait_for(holder.stdout.readline(), 20))
        holder.kill()  # SIGKILL: no release, no goodbye
        await holder.wait()

        assert await state.try_acquire("nightly-job") is None  # still held right after death
        last_renewal = await state.get("_lock.nightly-job")
        lease = await state.acquire("nightly-job", ttl=2, timeout=WAIT)

    assert last_renewal is not None and last_renewal.value["holder"] == "doomed-holder"
    assert lease.token > holder_token
    # Free only once the holder's last renewal had lived out its 2 s TTL.
    assert lease.acquired_at - last_renewal.time >= 2 - 0.05


async def test_fenced_write_of_an_expired_lease_is_refused(
    state: SharedState, other: SharedState
) -> None:
    stale = await state.acquire("ledger", ttl=1)
    await state.put_fenced("ledger.balance", 100, stale)

    fresh = await other.acquire("ledger", ttl=10, timeout=WAIT)  # wakes when `stale` expires

    with pytest.raises(
        LeaseLost,
        match=r"'ledger'.*no longer held.*'ledger.balance' was refused.*now held by 'bob'",
    ):
        await state.put_fenced("ledger.balance", 0, stale)
    with pytest.raises(LeaseLost):
        await state.update("ledger.balance", lambda b: b - 50, lease=stale)
    with pytest.raises(LeaseLost):
        await state.renew(stale)
    await other.put_fenced("ledger.balance", 150, fresh)
    got = await state.get("ledger.balance")
    assert got is not None and (got.value, got.writer) == (150, "bob")
    assert fresh.token > stale.token


async def test_lock_context_renews_a_holder_beyond_its_ttl(
    state: SharedState, other: SharedState
) -> None:
    async with state.lock("long-task", ttl=1) as lease:
        # Longer than the TTL: only renewals keep the lock from expiring meanwhile.
        with pytest.raises(LockTimeout):
            await other.acquire("long-task", timeout=1.6)
        await state.put_fenced("long-task.progress", "half", lease)

    assert not lease.held
    assert await other.try_acquire("long-task") is not None
