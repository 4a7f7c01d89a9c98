"""`GET /api/runs/{run_id}/stream`: a run's live output as Server-Sent Events (sse-starlette).

Each event is one StreamChunk (`event:` its kind, `data:` the chunk as JSON) with `id:` its
JetStream stream sequence, so a client that reconnects with `Last-Event-ID` (browsers do it
by themselves) gets every chunk after it, from any gateway, with no gap and no duplicate.
`?task=` follows one task (a workflow step's name, else a task id). Once the run has
finished and every chunk stored for it was sent, an `end` event (`{"run_id", "status"}`, no
id) says so and the stream closes. A gateway that stops closes its streams; clients come
back to another.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

import msgspec
from nats.aio.client import Client
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response

from chorus.client.runs import RunClient
from chorus.client.streams import ChunkReader
from chorus.config import Settings
from chorus.errors import ConfigError, InvalidMessage, NotFound
from chorus.gateway.system import require_connected
from chorus.messages import RunRecord, StreamChunk, encode
from chorus.subjects import check_token, stream_token

PING_S: Final = 15.0  # a comment line this often keeps proxies from closing an idle stream
SEND_TIMEOUT_S: Final = 30.0  # a client that takes no data for this long is dropped
RUN_WAIT_S: Final = 24 * 3600.0  # how long a stream watches for its run to finish


def _run_id(request: Request) -> str:
    run_id: str = request.path_params["run_id"]
    try:
        return check_token(run_id, "run id")
    except ConfigError:
        raise NotFound(
            f"no run {run_id!r}: run ids use only letters, digits, '-' and '_'"
        ) from None


def _after(request: Request) -> int:
    """The last stream sequence the client has: `Last-Event-ID`, or `?last_event_id=`."""
    value = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if value is None or value == "":
        return 0
    if not value.isdigit() or len(value) > 19:
        raise InvalidMessage(f"Last-Event-ID must be an event id this stream sent, not {value!r}")
    return int(value)


def _task(request: Request) -> str | None:
    task = request.query_params.get("task")
    if task is None:
        return None
    try:
        return stream_token(task, "task")
    except ConfigError as exc:
        raise InvalidMessage(exc.reason) from None


def chunk_event(chunk: StreamChunk) -> ServerSentEvent:
    """One chunk as an event; its `stream_seq` is in the data too, for clients that parse
    the stream themselves."""
    return ServerSentEvent(encode(chunk).decode(), event=chunk.kind, id=str(chunk.stream_seq))


class LiveOutput:
    """The route, over the gateway's connection."""

    def __init__(
        self, nc: Client, settings: Settings, runs: RunClient, *, stopping: asyncio.Event
    ) -> None:
        self.nc = nc
        self.settings = settings
        self.runs = runs
        self.stopping = stopping

    async def stream(self, request: Request) -> Response:
        """`GET /api/runs/{run_id}/stream` (see the module doc)."""
        run_id, after, task = _run_id(request), _after(request), _task(request)
        require_connected(self.nc)
        reader = ChunkReader(
            self.nc,
            self.settings.subjects,
            run_id,
            task,
            from_seq=after + 1,
            max_age_s=self.settings.stream_max_age,
        )
        await reader.open()  # a failure here is still an HTTP error, not a broken stream
        return EventSourceResponse(
            self._events(reader, run_id), ping=PING_S, send_timeout=SEND_TIMEOUT_S
        )

    async def _events(self, reader: ChunkReader, run_id: str) -> AsyncIterator[ServerSentEvent]:
        finished: asyncio.Task[RunRecord] = asyncio.create_task(self.runs.wait(run_id, RUN_WAIT_S))
        stopping = asyncio.create_task(self.stopping.wait())
        upcoming: asyncio.Task[StreamChunk] | None = None
        ended: RunRecord | None = None  # the run, once finished
        watching = True  # for the run to finish
        try:
            while True:
                if upcoming is None:
                    upcoming = asyncio.create_task(anext(reader))
                # Every chunk of a finished run is stored (an agent stores its final before
                # it answers): end once all that is stored was sent.
                if ended is not None and await reader.caught_up() and not upcoming.done():
                    end = {"run_id": run_id, "status": ended.status}
                    yield ServerSentEvent(msgspec.json.encode(end).decode(), event="end")
                    return
                watched = {upcoming, stopping} | ({finished} if watching else set())
                await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                if upcoming.done():
                    chunk, upcoming = upcoming.result(), None
                    yield chunk_event(chunk)
                elif stopping.done():
                    return
                elif watching and finished.done():
                    watching = False
                    # No record, or none finished within RUN_WAIT_S: follow until told.
                    if not finished.cancelled() and finished.exception() is None:
                        ended = finished.result()
        finally:
            for task in (upcoming, finished, stopping):
                if task is not None:
                    task.cancel()
            await asyncio.gather(finished, stopping, return_exceptions=True)
            await reader.close()
