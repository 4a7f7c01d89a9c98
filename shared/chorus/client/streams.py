"""Reading the live output of tasks: a run's chunks (or one task's), in order, resumable.

`ChunkReader` is an ordered JetStream consumer on `<prefix>.stream.<run>.>` (or one task's
subjects) starting at a stream sequence. Each chunk it yields carries `stream_seq`, the
sequence it is stored at: a reader that comes back with `from_seq=last.stream_seq + 1`
(another process, after a crash, an SSE client's `Last-Event-ID`) gets everything after it
and nothing twice. Within one reader, nats-py recreates the consumer after a gap or a
server restart from the last sequence delivered; the reader also drops anything at or
before the last chunk it yielded, so a replay never shows twice.

`LiveText` folds chunks into what each task attempt shows now: text grows with deltas, a
`final` replaces it with the answer, a `superseded` marker (or a `seq` that starts over:
the same attempt run again elsewhere) empties it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from types import TracebackType

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from chorus.errors import InvalidMessage
from chorus.messages import StreamChunk, decode
from chorus.nats.replicas import until_settled
from chorus.nats.streams import ensure_chunk_stream, stream_exists
from chorus.subjects import Subjects

log = logging.getLogger("chorus.client.streams")

HEARTBEAT_S = 1.0  # the server's idle heartbeat: two missed ones and the consumer is recreated
BUFFERED = 1024  # chunks held for a slow reader before the server is asked to wait
DEFAULT_MAX_AGE_S = 3600.0  # of the stream, should this reader be the one to create it


class ChunkReader:
    """The chunks of a run, or of one of its tasks, from stream sequence `from_seq` (0: all
    that is kept). Iterate it; `close()` (or `async with`) when done."""

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        run_id: str,
        task_id: str | None = None,
        *,
        from_seq: int = 0,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects
        self.subject = subjects.run_streams(run_id, task_id)
        self.from_seq = max(0, from_seq)
        self.position = max(0, self.from_seq - 1)  # the last sequence yielded (or skipped)
        self.max_age_s = max_age_s
        self.heartbeat_s = heartbeat_s
        self._queue: asyncio.Queue[Msg] = asyncio.Queue(BUFFERED)
        self._subscription: JetStreamContext.PushSubscription | None = None

    async def open(self) -> ChunkReader:
        """Start the consumer (iterating does it too); the stream is created if missing."""
        if self._subscription is not None:
            return self
        stream = self.subjects.chunk_stream
        if not await stream_exists(self.js, stream):
            await ensure_chunk_stream(self.js, self.subjects, self.max_age_s)
        config = (
            ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.from_seq
            )
            if self.from_seq > 0
            else ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        )
        # Asked again while a cluster elects the stream's leader (no answer until then).
        self._subscription = await until_settled(
            lambda: self.js.subscribe(
                self.subject,
                stream=stream,
                cb=self._queue.put,  # bounded: a slow reader holds the consumer back
                ordered_consumer=True,
                idle_heartbeat=self.heartbeat_s,
                config=config,
            ),
            stream,
            None,
            unanswered=True,
        )
        return self

    def __aiter__(self) -> ChunkReader:
        return self

    async def __anext__(self) -> StreamChunk:
        await self.open()
        while True:
            msg = await self._queue.get()
            sequence = msg.metadata.sequence.stream
            if sequence <= self.position:
                continue  # delivered again by a recreated consumer
            self.position = sequence
            try:
                chunk = decode(msg.data, StreamChunk)
            except InvalidMessage as exc:
                log.warning(
                    "skipping a malformed chunk",
                    extra={"subject": msg.subject, "sequence": sequence, "error": exc.reason},
                )
                continue
            chunk.stream_seq = sequence
            return chunk

    async def next(self, timeout: float) -> StreamChunk:
        """The next chunk; TimeoutError when none comes within `timeout` seconds."""
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    async def caught_up(self) -> bool:
        """Whether every chunk stored so far on these subjects has been yielded."""
        try:
            last = await self.js.get_last_msg(self.subjects.chunk_stream, self.subject)
        except NotFoundError:
            return True
        return last.seq is not None and last.seq <= self.position

    async def close(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.unsubscribe()

    async def __aenter__(self) -> ChunkReader:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


@dataclass
class AttemptText:
    """What one attempt of a task shows: its text so far, the tool it is in, whether it is
    done, and whether chunks were missed (then only the final is the whole answer)."""

    text: str = ""
    tool: str = ""
    done: bool = False
    gap: bool = False
    seq: int = 0


@dataclass
class LiveText:
    """Chunks folded into each task's current text: `add` returns the attempt it changed."""

    attempts: dict[tuple[str, int], AttemptText] = field(default_factory=dict)

    def add(self, chunk: StreamChunk) -> AttemptText:
        key = (chunk.task_id, chunk.attempt)
        view = self.attempts.setdefault(key, AttemptText())
        if chunk.kind == "superseded" or (chunk.seq == 1 and view.seq >= 1):
            view = self.attempts[key] = AttemptText()  # void: what it showed is not the answer
            if chunk.kind == "superseded":
                view.done = True
                return view
        if chunk.seq != view.seq + 1:
            view.gap = True
        view.seq = chunk.seq
        if chunk.kind == "delta":
            view.text += chunk.text
        elif chunk.kind == "tool_started":
            view.tool = chunk.tool
        elif chunk.kind == "tool_finished":
            view.tool = ""
        elif chunk.kind == "final":
            view.text, view.tool, view.done = chunk.text, "", True
        return view

    def current(self, task_id: str) -> AttemptText | None:
        """The latest attempt of `task_id` that has shown anything."""
        found = [(a, v) for (t, a), v in self.attempts.items() if t == task_id]
        return max(found, key=lambda pair: pair[0])[1] if found else None
