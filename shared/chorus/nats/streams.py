"""Create the streams and buckets Chorus needs, idempotently, from any process."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from chorus.errors import ConfigError
from chorus.nats.replicas import ensure_replicas, until_settled
from chorus.subjects import Subjects

log = logging.getLogger("chorus.nats.streams")

EVENTS_MAX_AGE_S = 7 * 24 * 3600
DEDUPE_WINDOW_S = 120
REGISTRY_TTL_S = 60  # an entry not refreshed for this long expires (its coordinator is gone)
TASKS_MAX_AGE_S = 7 * 24 * 3600
EFFECTS_MAX_AGE_S = 7 * 24 * 3600  # a retry later than this may repeat a side effect


_CONFIG_CONFLICT = 10058  # "stream name already in use with a different configuration"


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or, for the service that owns it, update it when it exists with
    another config.

    `config.num_replicas`: the services pass CHORUS_REPLICAS, what a new stream gets and
    what an existing one with fewer is raised to (an existing stream with more keeps them:
    lowering copies is an operator's decision). None: a client that does not own the stream
    (a command, the TaskQueue) creates it with one replica when it is missing and never
    changes an existing one."""
    name = config.name or ""
    if config.num_replicas is None:
        if await stream_exists(js, name):
            return
        try:
            await until_settled(lambda: js.add_stream(config), name, None)
        except BadRequestError as exc:
            if exc.err_code != _CONFIG_CONFLICT:  # made by another process meanwhile
                raise
        return
    await until_settled(lambda: _create_or_update(js, config), name, config.num_replicas)


async def _create_or_update(js: JetStreamContext, config: StreamConfig) -> None:
    wanted = config.num_replicas or 1
    try:
        await js.add_stream(config)
        return
    except BadRequestError as exc:
        if exc.err_code != _CONFIG_CONFLICT:
            raise
    existing = (await js.stream_info(config.name or "")).config.num_replicas or 1
    if wanted < existing:
        config = dataclasses.replace(config, num_replicas=existing)
        try:
            await js.add_stream(config)  # the same config: changes nothing, needs no update
            return
        except BadRequestError as exc:
            if exc.err_code != _CONFIG_CONFLICT:
                raise
    await js.update_stream(config)


async def stream_exists(js: JetStreamContext, name: str) -> bool:
    """Whether the stream exists: a check that needs only `$JS.API.STREAM.INFO.<name>`
    (asked again while a cluster elects the stream's leader)."""
    try:
        await until_settled(lambda: js.stream_info(name), name, None, unanswered=True)
    except NotFoundError:
        return False
    return True


STREAM_WAIT_S = 30.0


async def ensure_or_await(
    js: JetStreamContext,
    name: str,
    create: Callable[[], Awaitable[object]],
    *,
    within: float = STREAM_WAIT_S,
) -> None:
    """Make sure stream `name` exists: create it, or, where this process may not (its NATS
    credentials only read it), wait for the process that may (the coordinator, started at
    the same time) to create it. ConfigError naming the stream when it never appears."""
    if await stream_exists(js, name):
        return
    try:
        await create()
        return
    except (nats.errors.Error, TimeoutError) as exc:
        log.info("waiting for a stream to be created", extra={"stream": name, "error": repr(exc)})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    delay = 0.1
    while loop.time() < deadline:
        await asyncio.sleep(delay)  # backoff while the coordinator starts
        if await stream_exists(js, name):
            return
        delay = min(delay * 2, 2.0)
    raise ConfigError(
        f"stream {name} does not exist and this process may not create it: start the "
        "coordinator (chorus coordinator, or chorus up), which creates it"
    )


async def open_bucket(
    js: JetStreamContext, bucket: str, create: Callable[[], Awaitable[object]]
) -> KeyValue:
    """The bucket, looked up first (`$JS.API.STREAM.INFO.KV_<bucket>` is all agent credentials
    may do with it), created with `create` when missing, or else awaited from the process that
    may create it (the coordinator)."""
    await ensure_or_await(js, f"KV_{bucket}", create)
    return await js.key_value(bucket)


async def ensure_bucket(
    js: JetStreamContext, config: KeyValueConfig, *, replicas: int | None = None
) -> KeyValue:
    """Create the bucket, or adopt it as it is. `replicas` (the services, from
    CHORUS_REPLICAS): the copies it is created with, and what an existing bucket with fewer
    is raised to; None (a client) creates it with one when missing and leaves an existing
    one alone."""
    stream = f"KV_{config.bucket}"

    async def bind() -> KeyValue:
        # Binding reads the bucket's info, from its leader: asked again while one is elected.
        name = config.bucket
        return await until_settled(lambda: js.key_value(name), stream, None, unanswered=True)

    if replicas is None and await stream_exists(js, stream):
        return await bind()
    if replicas is not None:
        config = dataclasses.replace(config, replicas=replicas)
    try:
        return await until_settled(lambda: js.create_key_value(config), stream, config.replicas)
    except BadRequestError as exc:
        if exc.err_code != _CONFIG_CONFLICT:
            raise
    await ensure_replicas(js, stream, replicas)
    return await bind()


async def ensure_events_stream(
    js: JetStreamContext, subjects: Subjects, *, replicas: int | None = None
) -> None:
    await ensure_stream(
        js,
        StreamConfig(
            name=subjects.events_stream,
            subjects=[subjects.all_events],
            storage=StorageType.FILE,
            num_replicas=replicas,
            retention=RetentionPolicy.LIMITS,
            max_age=EVENTS_MAX_AGE_S,
            duplicate_window=DEDUPE_WINDOW_S,
        ),
    )


async def ensure_dispatch_stream(
    js: JetStreamContext,
    subjects: Subjects,
    *,
    dedupe_window: float = DEDUPE_WINDOW_S,
    replicas: int | None = None,
) -> None:
    """Submitted tasks wait here until an instance is free; each is removed once acked.

    `dedupe_window` (`Settings.dedupe_window`, CHORUS_DEDUPE_WINDOW): how long a task id
    submitted again is dropped by the stream itself; idempotency beyond it comes from the
    recorded outcome (chorus.client.durable)."""
    await ensure_stream(
        js,
        StreamConfig(
            name=subjects.dispatch_stream,
            subjects=[subjects.all_dispatch],
            storage=StorageType.FILE,
            num_replicas=replicas,
            retention=RetentionPolicy.WORK_QUEUE,
            duplicate_window=dedupe_window,
        ),
    )


async def ensure_dead_letter_stream(
    js: JetStreamContext, subjects: Subjects, *, replicas: int | None = None
) -> None:
    await ensure_stream(
        js,
        StreamConfig(
            name=subjects.dead_letter_stream,
            subjects=[subjects.all_dead_letters],
            storage=StorageType.FILE,
            num_replicas=replicas,
            retention=RetentionPolicy.LIMITS,
            duplicate_window=DEDUPE_WINDOW_S,
        ),
    )


async def ensure_tasks_bucket(
    js: JetStreamContext, subjects: Subjects, *, replicas: int | None = None
) -> KeyValue:
    return await ensure_bucket(
        js,
        KeyValueConfig(
            bucket=subjects.tasks_bucket,
            history=1,
            ttl=TASKS_MAX_AGE_S,
            storage=StorageType.FILE,
        ),
        replicas=replicas,
    )


async def ensure_agents_bucket(
    js: JetStreamContext, subjects: Subjects, *, replicas: int | None = None
) -> KeyValue:
    return await ensure_bucket(
        js,
        KeyValueConfig(
            bucket=subjects.agents_bucket,
            history=1,
            ttl=REGISTRY_TTL_S,
            storage=StorageType.FILE,
        ),
        replicas=replicas,
    )


SESSION_MARKER_TTL_S = 1  # expiry markers of turn tickets only need to reach the waiters


async def ensure_sessions_bucket(
    js: JetStreamContext, subjects: Subjects, ttl_s: float, *, replicas: int | None = None
) -> KeyValue:
    """Conversation sessions: one record per agent and session (history 1) that expires
    `ttl_s` after its last write, and turn tickets with a TTL of their own (so expiry markers
    wake waiters). Direct gets name the key in the API subject, so an agent's permissions can
    cover its own sessions only (a bucket made before without them gains them here)."""
    if not ttl_s >= 1:
        from chorus.errors import ConfigError

        raise ConfigError(f"CHORUS_SESSION_TTL must be at least 1 second, got {ttl_s!r}")
    return await ensure_direct_bucket(
        js,
        KeyValueConfig(
            bucket=subjects.sessions_bucket,
            description="Chorus conversation sessions and their turn tickets",
            history=1,
            ttl=ttl_s,
            storage=StorageType.FILE,
            limit_marker_ttl=SESSION_MARKER_TTL_S,
            direct=True,
        ),
        replicas=replicas,
    )


async def ensure_runs_stream(
    js: JetStreamContext, subjects: Subjects, *, replicas: int | None = None
) -> None:
    """Submitted runs (and resumes of waiting ones) wait here for an orchestrator; each is
    removed once its run finishes or parks again."""
    await ensure_stream(
        js,
        StreamConfig(
            name=subjects.runs_stream,
            subjects=[subjects.run_submit(), subjects.all_run_resumes],
            storage=StorageType.FILE,
            num_replicas=replicas,
            retention=RetentionPolicy.WORK_QUEUE,
            duplicate_window=DEDUPE_WINDOW_S,
        ),
    )


async def ensure_chunk_stream(
    js: JetStreamContext, subjects: Subjects, max_age_s: float, *, replicas: int | None = None
) -> None:
    """The live output of tasks: file storage, so a reader resumes across a server restart;
    kept `max_age_s` (CHORUS_STREAM_MAX_AGE), oldest dropped first."""
    if not max_age_s >= 1:
        from chorus.errors import ConfigError

        raise ConfigError(f"CHORUS_STREAM_MAX_AGE must be at least 1 second, got {max_age_s!r}")
    await ensure_stream(
        js,
        StreamConfig(
            name=subjects.chunk_stream,
            description="Chorus live output of tasks (text deltas, tool calls, answers)",
            subjects=[subjects.all_task_streams],
            storage=StorageType.FILE,
            num_replicas=replicas,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            max_age=max_age_s,
            # The window may not be longer than what the stream keeps.
            duplicate_window=min(DEDUPE_WINDOW_S, max_age_s),
        ),
    )


async def ensure_effects_bucket(
    js: JetStreamContext, subjects: Subjects, *, replicas: int | None = None
) -> KeyValue:
    """The effect ledger: intent, then result, of each side-effect tool call. Direct gets
    name the key in the API subject, so an agent's permissions can cover its own records
    only (a bucket made before without them gains them here)."""
    return await ensure_direct_bucket(
        js,
        KeyValueConfig(
            bucket=subjects.effects_bucket,
            history=1,
            ttl=EFFECTS_MAX_AGE_S,
            storage=StorageType.FILE,
            direct=True,
        ),
        replicas=replicas,
    )


async def ensure_direct_bucket(
    js: JetStreamContext, config: KeyValueConfig, *, replicas: int | None = None
) -> KeyValue:
    """A bucket read by direct gets, whose API subject names the key: what lets an agent's
    permissions cover its own keys only. A bucket made before without them gains them.
    `replicas` as for ensure_bucket."""
    bucket = await ensure_bucket(js, config, replicas=replicas)
    stream = (await js.stream_info(Subjects.kv_stream(config.bucket))).config
    if stream.allow_direct:
        return bucket
    stream.allow_direct = True
    log.info("enabling direct gets on a bucket", extra={"stream": stream.name})
    await js.update_stream(stream)
    return await js.key_value(config.bucket)


LIMITS_MAX_AGE_S = 24 * 3600  # a limit or pause nobody touched for a day is gone
BUDGETS_MAX_AGE_S = 31 * 24 * 3600  # an account untouched for a month (a run's, an agent's)


async def ensure_limits_bucket(
    js: JetStreamContext, subjects: Subjects, *, replicas: int | None = None
) -> KeyValue:
    """Shared rate-limit windows and provider pauses: one small value per key, read and
    written compare-and-set on every limited model call (direct gets: no leader round trip)."""
    return await ensure_bucket(
        js,
        KeyValueConfig(
            bucket=subjects.limits_bucket,
            description="Chorus shared rate limits and provider pauses",
            history=1,
            ttl=LIMITS_MAX_AGE_S,
            storage=StorageType.FILE,
            direct=True,
        ),
        replicas=replicas,
    )


async def ensure_budgets_bucket(
    js: JetStreamContext, subjects: Subjects, *, replicas: int | None = None
) -> KeyValue:
    """Budget accounts of runs and agents, reserved and settled compare-and-set."""
    return await ensure_bucket(
        js,
        KeyValueConfig(
            bucket=subjects.budgets_bucket,
            description="Chorus budget accounts",
            history=1,
            ttl=BUDGETS_MAX_AGE_S,
            storage=StorageType.FILE,
            direct=True,
        ),
        replicas=replicas,
    )


APPROVALS_MAX_AGE_S = 30 * 24 * 3600  # approval records and parked tasks, decided or not


async def ensure_approvals_bucket(
    js: JetStreamContext, subjects: Subjects, *, replicas: int | None = None
) -> KeyValue:
    """Tool calls waiting for a person and the tasks parked on them (chorus.client.approvals):
    each record changes compare-and-set, so history 1 is enough. Direct gets: an agent reads
    only its own approvals and parked tasks (chorus.auth.permissions)."""
    return await ensure_direct_bucket(
        js,
        KeyValueConfig(
            bucket=subjects.approvals_bucket,
            description="Chorus approvals and parked tasks",
            history=1,
            ttl=APPROVALS_MAX_AGE_S,
            storage=StorageType.FILE,
            direct=True,
        ),
        replicas=replicas,
    )
