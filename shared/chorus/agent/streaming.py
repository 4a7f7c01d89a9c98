"""What an agent publishes while it works on a task: its live output, as `StreamChunk`s.

One `TaskStream` per task attempt writes on `<prefix>.stream.<run>.<task>.<attempt>`: the
model's text (`delta`), each tool call as it starts and ends, and the answer (`final`). The
JetStream stream `<PREFIX>_STREAM` keeps them for `CHORUS_STREAM_MAX_AGE`, so a reader can
join late, or come back, and miss nothing. A retry (attempt 2 and on) first writes a
`superseded` marker on the previous attempt's subject.

Publishing never slows the loop. The loop's calls (`delta`, `tool_started`, ...) only append
to a buffer; one sender task per attempt publishes. Text is batched: the first delta goes at
once (the first token is what a reader waits for), later ones at most every
`FLUSH_INTERVAL_S` unless `FLUSH_CHARS` have piled up. Each chunk is a JetStream publish
whose ack the sender awaits before the next: the publish is confirmed stored (a core publish
captured by the stream would be lost unseen while the server restarts), a timed-out one is
retried under the same `Nats-Msg-Id` (the stream drops a repeat), and one writer awaiting
each ack keeps the subject in order. Streaming is a view: a chunk that cannot be stored is
logged and dropped (its `seq` leaves a gap a reader can see), never a failed task.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import nats.errors
from nats.aio.client import Client
from nats.js.errors import Error as JetStreamError

from chorus.errors import ChorusError, ConfigError
from chorus.llm.base import FunctionCall
from chorus.messages import (
    ChunkKind,
    StreamChunk,
    Task,
    ToolCallRecord,
    encode,
    headers,
    stream_key,
)
from chorus.messages.agents import truncated
from chorus.nats import wire
from chorus.nats.streams import ensure_chunk_stream, stream_exists
from chorus.subjects import Subjects

log = logging.getLogger("chorus.agent.streaming")

FLUSH_INTERVAL_S = 0.02  # text waits at most this long to join a batch
FLUSH_CHARS = 200  # or goes at once when this much is waiting
PUBLISH_WITHIN_S = 10.0  # a chunk is retried this long (a server restart) before it is dropped
CLOSE_TIMEOUT_S = 5.0  # the answer waits this long for its chunks to be stored
CHECK_TIMEOUT_S = 2.0  # for the stream's existence (a denied request only times out)
RECHECK_S = 30.0  # a missing stream is looked for again after this long, not on every task
TOOL_TEXT_CHARS = 500  # of a tool call's arguments or outcome in its chunks
FINAL_CHARS = 100_000  # of the answer in the final chunk


class TaskStreams:
    """The live streams of one agent instance's tasks, on its connection."""

    def __init__(self, nc: Client, subjects: Subjects, *, max_age_s: float) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects
        self.max_age_s = max_age_s
        self.is_ready = False  # the stream is known to be there
        self._checked_at = float("-inf")
        self._checking: asyncio.Task[bool] | None = None

    async def ready(self) -> bool:
        """Whether the stream is there to take chunks: looked for (and created when missing
        and allowed: agent credentials may only use it, the coordinator creates it) at most
        every RECHECK_S until it is; concurrent callers share one look."""
        if self.is_ready:
            return True
        if self._checking is None:
            if time.monotonic() - self._checked_at < RECHECK_S:
                return False
            self._checked_at = time.monotonic()
            self._checking = asyncio.create_task(self._check())
            self._checking.add_done_callback(lambda _: setattr(self, "_checking", None))
        return await asyncio.shield(self._checking)

    async def _check(self) -> bool:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                if not await stream_exists(self.js, self.subjects.chunk_stream):
                    await ensure_chunk_stream(self.js, self.subjects, self.max_age_s)
        except (TimeoutError, nats.errors.Error, JetStreamError, ConfigError) as exc:
            log.warning(
                "live output not published: its stream is missing and cannot be created",
                extra={"stream": self.subjects.chunk_stream, "error": repr(exc)},
            )
            return False
        self.is_ready = True
        return True

    def open(self, task: Task, agent: str) -> TaskStream:
        return TaskStream(self, task, agent)

    @contextlib.asynccontextmanager
    async def opened(self, task: Task, agent: str) -> AsyncIterator[TaskStream]:
        """A task's stream for the time its handler runs: its chunks are stored before this
        returns (or dropped after `CLOSE_TIMEOUT_S`), and cancelled with the task."""
        stream = self.open(task, agent)
        try:
            yield stream
        except Exception:
            await stream.close()  # what was shown before the failure stays readable
            raise
        except BaseException:
            stream.abort()
            raise
        await stream.close()


class TaskStream:
    """One task attempt's live output. The loop's calls never wait (see the module doc)."""

    def __init__(self, streams: TaskStreams, task: Task, agent: str) -> None:
        self._streams = streams
        self.run_id = task.run_id
        self.task_key = stream_key(task)
        self.attempt = task.attempt
        self.agent = agent
        self.enabled = True
        try:
            self.subject = streams.subjects.task_stream(task.run_id, self.task_key, task.attempt)
        except ConfigError as exc:  # an id that cannot be a subject token: no live output
            log.debug("task not streamed", extra={"task_id": task.task_id, "error": str(exc)})
            self.subject, self.enabled = "", False
        # Unique per run of this attempt: a publish retried is a duplicate, the same attempt
        # run again elsewhere (its instance lost) is not.
        self._publisher = uuid.uuid4().hex[:16]
        self._seq = 0
        self._text: list[str] = []
        self._chars = 0
        self._last_cut = float("-inf")
        self._outbox: collections.deque[tuple[str, StreamChunk]] = collections.deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._sender: asyncio.Task[None] | None = None
        if self.enabled and task.attempt > 1:
            old = streams.subjects.task_stream(task.run_id, self.task_key, task.attempt - 1)
            replaced = f"attempt {task.attempt} replaces it"
            self._queue(old, self._chunk("superseded", replaced, seq=0, attempt=task.attempt - 1))

    @property
    def sent(self) -> int:
        """How many chunks this attempt has numbered so far."""
        return self._seq

    # what the loop and handlers call: never awaits

    def delta(self, text: str) -> None:
        """Text the model (or the handler) has just written."""
        if not self.enabled or self._closing or not text:
            return
        was_empty = not self._text
        self._text.append(text)
        self._chars += len(text)
        if self._chars >= FLUSH_CHARS:
            self._cut()
        elif not was_empty:
            return  # the sender already knows text is waiting
        self._wake_sender()

    def tool_started(self, call: FunctionCall) -> None:
        self._event("tool_started", truncated(call.arguments, TOOL_TEXT_CHARS), call.name)

    def tool_finished(self, call: FunctionCall, record: ToolCallRecord) -> None:
        outcome = f"error: {record.error}" if record.error else record.output
        self._event("tool_finished", truncated(outcome, TOOL_TEXT_CHARS), call.name)

    def final(self, text: str) -> None:
        """The task's answer, whole (a reader that missed deltas still shows it)."""
        self._event("final", truncated(text, FINAL_CHARS))

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Send what is buffered and wait until it is stored (at most `timeout`); at once
        when the stream is not known to be there (no answer waits on a missing stream)."""
        self._cut()
        self._closing = True
        if self._sender is None:
            return
        if not self._streams.is_ready:
            self.abort()
            return
        self._wake.set()
        done, _ = await asyncio.wait({self._sender}, timeout=timeout)
        if not done:
            log.warning(
                "live output not stored in time; the rest is dropped",
                extra={"subject": self.subject, "timeout_s": timeout},
            )
            self.abort()

    def abort(self) -> None:
        """Stop at once (the task was cancelled): what is not sent is dropped."""
        self._closing = True
        if self._sender is not None:
            self._sender.cancel()

    # inside

    def _event(self, kind: ChunkKind, text: str = "", tool: str = "") -> None:
        if not self.enabled or self._closing:
            return
        self._cut()
        self._queue(self.subject, self._chunk(kind, text, tool=tool))

    def _chunk(
        self, kind: ChunkKind, text: str, *, tool: str = "", seq: int = -1, attempt: int = 0
    ) -> StreamChunk:
        if seq < 0:
            self._seq += 1
            seq = self._seq
        return StreamChunk(
            run_id=self.run_id,
            task_id=self.task_key,
            attempt=attempt or self.attempt,
            seq=seq,
            kind=kind,
            text=text,
            tool=tool,
            agent=self.agent,
        )

    def _cut(self) -> None:
        """The buffered text becomes the next delta chunk."""
        if not self._text:
            return
        text = "".join(self._text)
        self._text.clear()
        self._chars = 0
        self._last_cut = time.monotonic()
        self._queue(self.subject, self._chunk("delta", text))

    def _queue(self, subject: str, chunk: StreamChunk) -> None:
        self._outbox.append((subject, chunk))
        self._wake_sender()

    def _wake_sender(self) -> None:
        self._wake.set()
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name=f"stream {self.subject}")

    async def _send(self) -> None:
        try:
            if not await self._streams.ready():
                return  # logged by ready(); this attempt is not streamed
            while True:
                if self._outbox:
                    await self._publish(*self._outbox.popleft())
                    continue
                if self._text:
                    wait = self._last_cut + FLUSH_INTERVAL_S - time.monotonic()
                    if wait > 0 and not self._closing:
                        self._wake.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(wait):
                                await self._wake.wait()  # more text, an event, or close
                    else:
                        self._cut()
                    continue
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
        except Exception:
            log.exception("live output stopped", extra={"subject": self.subject})

    async def _publish(self, subject: str, chunk: StreamChunk) -> None:
        try:
            await wire.publish_durably(
                self._streams.js,
                subject,
                encode(chunk),
                headers.for_stream_chunk(self._publisher, chunk.seq),
                within=PUBLISH_WITHIN_S,
            )
        except (nats.errors.Error, JetStreamError, ChorusError) as exc:
            log.warning(
                "live output chunk dropped",
                extra={"subject": subject, "seq": chunk.seq, "error": repr(exc)},
            )
