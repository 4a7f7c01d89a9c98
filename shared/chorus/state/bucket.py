"""The state bucket at the stream level: conditional publishes, last/next reads, watches.

nats-py's `KeyValue` does not expose what shared state needs: a per-message TTL in seconds on
an update, an expectation on another key's revision (fencing), a payload on delete markers,
or server expiry markers when checking whether a key is free. So this module talks to the
bucket's stream directly, with the same subjects and headers a KV client uses; any KV client
(`nats kv get chorus-state k`) still reads the bucket.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, KeyValueConfig, StorageType
from nats.js.errors import APIError, BadRequestError, NotFoundError

from chorus.errors import Conflict, InvalidKey
from chorus.messages import headers
from chorus.nats import wire
from chorus.nats.jetstream import last_values, ordered_watch
from chorus.nats.replicas import ensure_replicas, until_settled
from chorus.subjects import Subjects

log = logging.getLogger("chorus.state")

HISTORY: Final = 16
# How long the server keeps the marker it writes when a lease expires; waiters only need to
# see it arrive, and a key with no message at all is just as free. Kept at the minimum: the
# server raises every message TTL in the bucket to at least this (seen on 2.15).
MARKER_TTL_S: Final = 1
# Ephemeral watch consumers are removed this long after their subscriber is gone.
WATCH_INACTIVE_S: Final = 30.0
_WRONG_LAST_SEQUENCE: Final = (10071, 10164)
_STREAM_CONFIG_CONFLICT: Final = 10058

_KEY = re.compile(r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*$")
_PATTERN_TOKEN = re.compile(r"^[-/_=a-zA-Z0-9]+$")

PUT: Final = "put"
DELETE: Final = "delete"
PURGE: Final = "purge"
EXPIRED: Final = "expired"


def check_key(key: str, what: str = "key") -> str:
    """A KV key: `[-/_=.a-zA-Z0-9]`, dot-separated, not starting or ending with `.`."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise InvalidKey(
            f"{what} {key!r} is not a valid key: use letters, digits and '-/_=', with '.' "
            "between parts (not at the start or end, not doubled)"
        )
    return key


def check_pattern(pattern: str) -> str:
    """A key or a pattern of keys: tokens may be `*`, and the last may be `>`."""
    tokens = pattern.split(".") if isinstance(pattern, str) else [""]
    for i, token in enumerate(tokens):
        if token == "*" or (token == ">" and i == len(tokens) - 1):
            continue
        if not _PATTERN_TOKEN.match(token):
            raise InvalidKey(
                f"key pattern {pattern!r} is not valid: dot-separated keys, where a part may be "
                "'*' and the last part may be '>'"
            )
    return pattern


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """One message of the bucket: a value, or a delete/purge/expiry marker."""

    key: str
    revision: int
    operation: str  # put | delete | purge | expired
    data: bytes
    time: float  # server timestamp, seconds since the epoch

    @property
    def removed(self) -> bool:
        return self.operation != PUT


def _operation(received: dict[str, str] | None) -> str:
    op = headers.kv_operation(received)
    if op == "DEL":
        return DELETE
    if op == "PURGE":
        return PURGE
    # Markers the server writes when a message's TTL or the bucket's max age removes it.
    if op == "MARKER":
        return EXPIRED
    return PUT


def _timestamp(value: datetime | None) -> float:
    return value.timestamp() if value is not None else 0.0


RecordCallback = Callable[[Record], Awaitable[None]]


class BucketWatch:
    """An ordered push consumer on some keys of the bucket; `close()` stops it."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._sub: JetStreamContext.PushSubscription | None = None

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is None or self._nc.is_closed or self._nc.is_draining:
            return  # the connection's end removed the subscription already
        await sub.unsubscribe()


class StateBucket:
    """The `<prefix>-state` bucket, created idempotently by `ensure`."""

    def __init__(
        self, nc: Client, subjects: Subjects, *, direct: bool, min_ttl_s: int = MARKER_TTL_S
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.js = nc.jetstream()
        self.stream = subjects.state_stream
        # The shortest TTL the server keeps in this bucket: its expiry-marker TTL.
        self.min_ttl_s = min_ttl_s
        self._direct = direct

    @classmethod
    async def ensure(
        cls, nc: Client, subjects: Subjects, *, replicas: int | None = None
    ) -> StateBucket:
        """Create the bucket (file storage, history, TTLs allowed) or adopt an existing one.
        `replicas` (the coordinator's CHORUS_REPLICAS): its copies in a cluster, and what an
        existing bucket with fewer is raised to; None: one when created, else left alone."""
        js = nc.jetstream()
        config = KeyValueConfig(
            bucket=subjects.state_bucket,
            description="Chorus shared state and lock leases",
            history=HISTORY,
            storage=StorageType.FILE,
            direct=True,
            limit_marker_ttl=MARKER_TTL_S,
            replicas=replicas or 1,
        )
        # Look before creating: agent credentials may read the bucket but not create it.
        try:
            await js.stream_info(subjects.state_stream)
        except NotFoundError:
            try:
                await until_settled(
                    lambda: js.create_key_value(config), subjects.state_stream, replicas
                )
            except BadRequestError as exc:
                if exc.err_code != _STREAM_CONFIG_CONFLICT:
                    raise
        await ensure_replicas(js, subjects.state_stream, replicas)
        await cls._enable_leases(js, subjects.state_stream)
        stream = (await js.stream_info(subjects.state_stream)).config
        return cls(
            nc,
            subjects,
            direct=bool(stream.allow_direct),
            min_ttl_s=math.ceil(stream.subject_delete_marker_ttl or MARKER_TTL_S),
        )

    @staticmethod
    async def _enable_leases(js: JetStreamContext, stream: str) -> None:
        """A bucket made elsewhere (another tool, an older version) gains what leases need."""
        config = (await js.stream_info(stream)).config
        if config.allow_msg_ttl and config.subject_delete_marker_ttl:
            return
        config.allow_msg_ttl = True
        config.subject_delete_marker_ttl = config.subject_delete_marker_ttl or MARKER_TTL_S
        log.info("enabling per-key TTL on the state bucket", extra={"stream": stream})
        await js.update_stream(config)

    async def last(self, key: str) -> Record | None:
        """The key's latest message (a marker included), or None when it has none."""
        subject = self.subjects.state_subject(key)
        try:
            raw = await self.js.get_msg(self.stream, subject=subject, direct=self._direct)
        except NotFoundError:
            return None
        return Record(
            key=key,
            revision=raw.seq or 0,
            operation=_operation(raw.headers),
            data=raw.data or b"",
            time=_timestamp(raw.time),
        )

    async def history(self, key: str) -> list[Record]:
        """Every stored message of the key, oldest first (the bucket keeps the last 16)."""
        subject = self.subjects.state_subject(key)
        records: list[Record] = []
        seq = 1
        while True:
            try:
                raw = await self.js.get_msg(
                    self.stream, seq=seq, subject=subject, direct=self._direct, next=True
                )
            except NotFoundError:
                return records
            records.append(
                Record(
                    key=key,
                    revision=raw.seq or 0,
                    operation=_operation(raw.headers),
                    data=raw.data or b"",
                    time=_timestamp(raw.time),
                )
            )
            seq = (raw.seq or seq) + 1

    async def keys(self, pattern: str) -> list[str]:
        """The keys matching `pattern` that have a value now (deleted and expired ones left
        out): one snapshot read of the last message per key."""
        found = await last_values(self.js, self.stream, self.subjects.state_subject(pattern))
        return [self.subjects.state_key(msg.subject) for msg in found]

    async def last_revision(self) -> int:
        """The bucket's latest revision over all keys."""
        return int((await self.js.stream_info(self.stream)).state.last_seq)

    async def publish(
        self,
        key: str,
        payload: bytes,
        *,
        expect: int | None = None,
        expect_key: str | None = None,
        operation: str | None = None,
        ttl_s: int | None = None,
        rollup: bool = False,
    ) -> int:
        """Store one message; return its revision.

        `expect` is the revision the key must be at (0: no value), or, with `expect_key`,
        the revision that other key must be at. Raises Conflict when it is not.
        """
        sent = headers.for_kv_write(
            expect=expect,
            expect_subject=None if expect_key is None else self.subjects.state_subject(expect_key),
            operation=operation,
            rollup=rollup,
            ttl_s=ttl_s,
        )
        try:
            ack = await wire.js_publish(self.js, self.subjects.state_subject(key), payload, sent)
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                on = expect_key or key
                raise Conflict(
                    f"key {on!r} is no longer at revision {expect}: another writer got there first"
                ) from None
            raise
        return int(ack.seq)

    async def watch(
        self, pattern: str, on_record: RecordCallback, *, include_current: bool = False
    ) -> BucketWatch:
        """Call `on_record` for each new message on keys matching `pattern`, in order.

        Only messages stored after the call are delivered, unless `include_current`, which
        first delivers the latest message of every matching key.
        """

        async def on_msg(msg: Msg) -> None:
            meta = msg.metadata
            await on_record(
                Record(
                    key=self.subjects.state_key(msg.subject),
                    revision=meta.sequence.stream,
                    operation=_operation(msg.headers),
                    data=msg.data,
                    time=_timestamp(meta.timestamp),
                )
            )

        watch = BucketWatch(self.nc)
        # An ordered consumer re-creates itself after a gap or a reconnect, resuming after the
        # last revision it delivered, so no change is missed or repeated.
        watch._sub = await ordered_watch(
            self.js,
            self.subjects.state_subject(pattern),
            stream=self.stream,
            cb=on_msg,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT if include_current else DeliverPolicy.NEW,
            inactive_threshold=WATCH_INACTIVE_S,
        )
        return watch
