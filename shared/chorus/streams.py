"""Create the streams and buckets Chorus needs, idempotently, from any process."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from chorus.subjects import Subjects

EVENTS_MAX_AGE_S = 7 * 24 * 3600


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or update it when it exists with another config."""
    try:
        await js.add_stream(config)
    except BadRequestError as exc:  # "stream name already in use with a different configuration"
        if exc.err_code != 10058:
            raise
        await js.update_stream(config)


async def ensure_events_stream(js: JetStreamContext, subjects: Subjects) -> None:
    await ensure_stream(
        js,
        StreamConfig(
            name=subjects.events_stream,
            subjects=[subjects.all_events],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            max_age=EVENTS_MAX_AGE_S,
            duplicate_window=120,
        ),
    )
