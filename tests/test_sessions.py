"""Conversation sessions in KV: replicas share history, bounds hold, turns are ordered."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig

from chorus.agent import Agent
from chorus.agent.sessions import SessionStore, bound_items
from chorus.client import ChorusClient
from chorus.config import Settings
from chorus.errors import ConfigError, SessionBusy, SessionInterrupted
from chorus.llm.base import ModelRequest
from chorus.llm.offline import OfflineModel
from chorus.messages import Task, decode
from chorus.nats.connection import connect
from chorus.nats.jetstream import ordered_watch
from chorus.nats.streams import ensure_sessions_bucket
from chorus.specs.agent import load_spec
from tests.cli import achorus
from tests.helpers import StartHost, write_spec

OpenStore = Callable[..., Awaitable[SessionStore]]


@pytest.fixture
async def open_store(settings: Settings) -> AsyncIterator[OpenStore]:
    """A SessionStore on a connection of its own, as one replica would have."""
    connections: list[Client] = []

    async def open_one(**kw: Any) -> SessionStore:
        kw.setdefault("agent", "chat")
        nc = await connect(settings, f"replica-{len(connections)}")
        connections.append(nc)
        return await SessionStore(nc, settings.subjects, ttl=settings.session_ttl, **kw).open()

    yield open_one
    for nc in connections:
        await nc.close()


def said(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "content": text}


async def test_a_new_session_loads_empty(open_store: OpenStore) -> None:
    store = await open_store()

    session = await store.load("fresh")

    assert session.items == [] and session.turns == 0


async def test_turn_two_on_another_replica_sees_turn_one(open_store: OpenStore) -> None:
    first, second = await open_store(), await open_store()
    await first.append(
        "chat1", [said("user", "hi"), said("assistant", "hello")], max_items=50, max_bytes=65536
    )

    seen = await second.load("chat1")
    await second.append("chat1", [said("user", "again")], max_items=50, max_bytes=65536)

    assert seen.items == [said("user", "hi"), said("assistant", "hello")]
    after = await first.load("chat1")
    assert [item["content"] for item in after.items] == ["hi", "hello", "again"]
    assert after.turns == 2


async def test_concurrent_appends_from_two_replicas_lose_nothing(open_store: OpenStore) -> None:
    first, second = await open_store(), await open_store()

    await asyncio.gather(
        *(
            store.append("busy", [said("user", f"{name}{i}")], max_items=100, max_bytes=65536)
            for i in range(10)
            for name, store in (("a", first), ("b", second))
        )
    )

    session = await first.load("busy")
    assert sorted(item["content"] for item in session.items) == sorted(
        f"{name}{i}" for i in range(10) for name in "ab"
    )
    assert session.turns == 20


async def test_history_keeps_the_newest_items_within_max_items(open_store: OpenStore) -> None:
    store = await open_store()
    for i in range(5):
        await store.append("short", [said("user", f"m{i}")], max_items=3, max_bytes=65536)

    session = await store.load("short")

    assert [item["content"] for item in session.items] == ["m2", "m3", "m4"]


async def test_history_keeps_the_newest_items_within_max_bytes(open_store: OpenStore) -> None:
    store = await open_store()
    for i in range(5):
        await store.append("small", [said("user", f"{i}" * 100)], max_items=50, max_bytes=300)

    session = await store.load("small")

    assert [item["content"][0] for item in session.items] == ["3", "4"]
    assert len(json.dumps(session.items, separators=(",", ":"))) <= 300


def test_a_tool_output_whose_call_was_dropped_goes_with_it() -> None:
    items = [
        {"type": "function_call", "call_id": "c1", "name": "add", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "5"},
        said("assistant", "it is 5"),
    ]

    assert bound_items(items, max_items=2, max_bytes=65536) == [said("assistant", "it is 5")]


async def test_the_bucket_expires_sessions_after_the_session_ttl(
    settings: Settings, nc: Client
) -> None:
    await SessionStore(nc, settings.subjects, ttl=3600, agent="chat").open()

    info = await nc.jetstream().stream_info(settings.subjects.sessions_stream)

    assert info.config.max_age == 3600
    assert info.config.max_msgs_per_subject == 1


async def test_two_agents_with_one_session_id_keep_two_conversations(
    open_store: OpenStore, settings: Settings, nc: Client
) -> None:
    chat, other = await open_store(agent="chat"), await open_store(agent="other")
    await chat.append("shared", [said("user", "for chat")], max_items=50, max_bytes=65536)
    await other.append("shared", [said("user", "for other")], max_items=50, max_bytes=65536)

    seen = {store.agent: (await store.load("shared")).items for store in (chat, other)}

    assert seen == {"chat": [said("user", "for chat")], "other": [said("user", "for other")]}
    subjects = settings.subjects
    stored = await nc.jetstream().get_last_msg(
        subjects.sessions_stream, subjects.session_subject("session.other.shared")
    )
    assert b"for other" in (stored.data or b"")


async def test_a_bucket_made_without_direct_gets_gains_them(settings: Settings, nc: Client) -> None:
    """Sessions are read by direct get (the key in the API subject, which permissions
    scope): the coordinator switches it on for a bucket an older version made."""
    js = nc.jetstream()
    await js.create_key_value(
        KeyValueConfig(bucket=settings.subjects.sessions_bucket, history=1, ttl=3600)
    )

    await ensure_sessions_bucket(js, settings.subjects, 3600)

    info = await js.stream_info(settings.subjects.sessions_stream)
    assert info.config.allow_direct


async def test_a_bad_session_id_is_refused_naming_it(open_store: OpenStore) -> None:
    store = await open_store()

    with pytest.raises(ConfigError, match=r"session id 'a\.b'"):
        await store.load("a.b")


# --- turns -------------------------------------------------------------------------------


async def ticket_written(nc: Client, settings: Settings, session_id: str) -> asyncio.Queue[str]:
    """Every ticket write of the session, as it is stored (core subscription on its keys)."""
    written: asyncio.Queue[str] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        if msg.data:
            written.put_nowait(msg.subject)

    subject = settings.subjects.session_subject(
        settings.subjects.session_turns_key("chat", session_id)
    )
    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    return written


async def test_enqueued_turns_run_one_at_a_time_in_arrival_order(
    open_store: OpenStore, settings: Settings, nc: Client
) -> None:
    stores = [await open_store() for _ in range(3)]
    written = await ticket_written(nc, settings, "queue")
    log: list[tuple[str, str, float]] = []
    release_a = asyncio.Event()

    async def turn(name: str, store: SessionStore, hold: asyncio.Event | None) -> None:
        async with store.turn("queue", "enqueue", timeout=30):
            log.append((name, "in", time.monotonic()))
            if hold is not None:
                await hold.wait()
            log.append((name, "out", time.monotonic()))

    a = asyncio.create_task(turn("a", stores[0], release_a))
    await asyncio.wait_for(written.get(), 10)
    b = asyncio.create_task(turn("b", stores[1], None))
    await asyncio.wait_for(written.get(), 10)
    c = asyncio.create_task(turn("c", stores[2], None))
    await asyncio.wait_for(written.get(), 10)
    release_a.set()
    await asyncio.wait_for(asyncio.gather(a, b, c), 30)

    assert [(name, what) for name, what, _ in log] == [
        ("a", "in"),
        ("a", "out"),
        ("b", "in"),
        ("b", "out"),
        ("c", "in"),
        ("c", "out"),
    ]
    handoff = log[2][2] - log[1][2]
    print(f"enqueue handoff a -> b: {handoff * 1000:.1f} ms")
    assert handoff < 1.0  # woken by the watch, not by a ticket's expiry


async def test_a_second_turn_under_reject_fails_with_session_busy(open_store: OpenStore) -> None:
    holder, other = await open_store(), await open_store()

    async with holder.turn("chat", "reject"):
        with pytest.raises(SessionBusy) as busy:
            async with other.turn("chat", "reject"):
                pytest.fail("the second turn must not run")

    assert busy.value.code == "session_busy"
    async with other.turn("chat", "reject"):  # free again once the first is done
        pass


async def test_a_turn_under_interrupt_cancels_the_running_turn(open_store: OpenStore) -> None:
    first, second = await open_store(), await open_store()
    running = asyncio.Event()
    order: list[str] = []

    async def long_turn() -> None:
        async with first.turn("talk", "interrupt", timeout=30):
            running.set()
            try:
                await asyncio.Event().wait()  # until interrupted
            finally:
                order.append("first stopped")

    slow = asyncio.create_task(long_turn())
    await asyncio.wait_for(running.wait(), 10)
    async with second.turn("talk", "interrupt", timeout=30):
        order.append("second ran")

    with pytest.raises(SessionInterrupted, match="interrupted by a newer task"):
        await slow
    assert order == ["first stopped", "second ran"]


async def test_an_interrupt_calls_the_given_callback_instead_of_cancelling(
    open_store: OpenStore,
) -> None:
    first, second = await open_store(), await open_store()
    interrupted = asyncio.Event()
    running = asyncio.Event()

    async def cooperative_turn() -> None:
        async with first.turn("coop", "interrupt", on_interrupt=interrupted.set, timeout=30):
            running.set()
            await interrupted.wait()  # stops by itself, at a point of its choosing

    task = asyncio.create_task(cooperative_turn())
    await asyncio.wait_for(running.wait(), 10)
    async with second.turn("coop", "interrupt", timeout=30):
        pass

    await asyncio.wait_for(task, 10)
    assert interrupted.is_set()


# --- spec, task, CLI ------------------------------------------------------------------------


def test_the_session_spec_field_reads_bounds_and_policy(tmp_path: Path) -> None:
    plain = load_spec(write_spec(tmp_path, "plain", "name: plain\n"))
    chat = load_spec(
        write_spec(tmp_path, "chat", "name: chat\nsession:\n  max_items: 10\n  policy: reject\n")
    )

    assert plain.session is None
    assert chat.session is not None
    assert (chat.session.max_items, chat.session.max_bytes, chat.session.policy) == (
        10,
        65536,
        "reject",
    )


def test_an_unknown_session_policy_is_refused_naming_the_field(tmp_path: Path) -> None:
    path = write_spec(tmp_path, "chat", "name: chat\nsession:\n  policy: later\n")

    with pytest.raises(ConfigError, match=r"session\.policy"):
        load_spec(path)


def test_a_task_carries_a_session_id() -> None:
    task = decode(b'{"input": "hi", "session_id": "chat1"}', Task)

    assert task.session_id == "chat1"
    assert Task(input="x").session_id == ""


async def test_cli_session_show_prints_the_items(open_store: OpenStore, settings: Settings) -> None:
    store = await open_store()
    await store.append(
        "cli1", [said("user", "what is 2+3?"), said("assistant", "5")], max_items=50, max_bytes=4096
    )

    text = await achorus(settings, "session", "show", "cli1")
    as_json = await achorus(settings, "session", "show", "cli1", "--agent", "chat", "--json")
    missing = await achorus(settings, "session", "show", "nobody")
    not_this_agent = await achorus(settings, "session", "show", "cli1", "--agent", "other")

    assert text.returncode == 0, text.stderr
    assert "of agent chat" in text.stdout
    assert "user: what is 2+3?" in text.stdout and "assistant: 5" in text.stdout
    assert json.loads(as_json.stdout)["items"][1] == said("assistant", "5")
    assert missing.returncode == 1 and "no session 'nobody'" in missing.stderr
    assert not_this_agent.returncode == 1
    assert "no session 'cli1' of agent 'other'" in not_this_agent.stderr


async def test_cli_session_show_asks_for_the_agent_when_several_have_the_id(
    open_store: OpenStore, settings: Settings
) -> None:
    for agent in ("chat", "other"):
        store = await open_store(agent=agent)
        await store.append("both", [said("user", agent)], max_items=50, max_bytes=4096)

    ambiguous = await achorus(settings, "session", "show", "both")
    picked = await achorus(settings, "session", "show", "both", "--agent", "other")

    assert ambiguous.returncode == 2
    assert "agents chat, other" in ambiguous.stderr and "--agent NAME" in ambiguous.stderr
    assert picked.returncode == 0 and "user: other" in picked.stdout


async def test_a_dead_holders_turn_passes_to_the_waiter_when_its_ticket_expires(
    settings: Settings, open_store: OpenStore
) -> None:
    holder_nc = await connect(settings, "doomed")
    holder = await SessionStore(
        holder_nc, settings.subjects, ttl=settings.session_ttl, agent="chat", ticket_ttl_s=2
    ).open()
    waiter = await open_store()
    entered = asyncio.Event()

    async def hold_forever() -> None:
        async with holder.turn("orphan", "enqueue"):
            entered.set()
            await asyncio.Event().wait()

    stuck = asyncio.create_task(hold_forever())
    await asyncio.wait_for(entered.wait(), 10)
    await holder_nc.close()  # the holder's process is gone: no renewals, no removal
    started = time.monotonic()
    async with waiter.turn("orphan", "enqueue", timeout=20):
        waited = time.monotonic() - started

    assert 0.5 < waited < 10  # the ticket's 2 s TTL ran out, then the watch woke the waiter
    stuck.cancel()
    await asyncio.wait([stuck])


async def test_an_agent_replica_answers_turn_two_with_the_history_of_turn_one(
    start_host: StartHost, client: ChorusClient
) -> None:
    seen: list[tuple[str, ...]] = []

    def remember(request: ModelRequest) -> str:
        seen.append(tuple(getattr(item, "text", "") for item in request.history))
        return f"answer to {request.input}"

    agent = Agent(name="chat", capabilities=["chat"])
    first = await start_host(agent, model=OfflineModel(script=remember))
    second = await start_host(agent, model=OfflineModel(script=remember))

    await client.run_task(Task(input="my name is Ada", session_id="s1"), instance=first.instance)
    reply = await client.run_task(
        Task(input="what is my name?", session_id="s1"), instance=second.instance
    )

    assert seen == [(), ("my name is Ada", "answer to my name is Ada")]
    assert reply.output == "answer to what is my name?"


async def test_a_named_watch_recreated_after_a_gap_gets_a_fresh_name_and_keeps_delivering(
    nc: Client, settings: Settings
) -> None:
    """The turn watch's consumer is named (its filter then sits in the API subject). nats-py
    re-creates an ordered consumer after a gap with the name it was given; the old one still
    exists and cannot change its start, so each re-creation takes a new name."""
    store = await SessionStore(nc, settings.subjects, ttl=3600, agent="chat").open()
    subjects = settings.subjects
    pattern = subjects.session_subject(subjects.session_turns_key("chat", "gap"))
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        seen.put_nowait(msg.subject)

    watch = await ordered_watch(
        nc.jetstream(), pattern, stream=subjects.sessions_stream, cb=on_msg, named=True
    )
    first = (await watch.consumer_info()).name
    await store.kv.put(subjects.session_turn_key("chat", "gap", "t1"), b"{}")
    assert (await asyncio.wait_for(seen.get(), 5)).endswith(".t1")

    jsi = watch._sub._jsi  # what nats-py does on a gap in the delivery sequence
    await jsi.reset_ordered_consumer(jsi._sseq + 1)
    await store.kv.put(subjects.session_turn_key("chat", "gap", "t2"), b"{}")

    assert (await asyncio.wait_for(seen.get(), 5)).endswith(".t2")
    assert watch._consumer != first
    await watch.unsubscribe()
