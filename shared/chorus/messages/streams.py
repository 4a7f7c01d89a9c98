"""The live output of a task while an agent works on it: `StreamChunk`, one message per batch
of text or per tool call, on `<prefix>.stream.<run>.<task>.<attempt>` (chorus.subjects).

A reader folds the chunks of one subject in `seq` order: `delta` appends text, `tool_started`
and `tool_finished` say what the agent is doing, `final` carries the whole answer. A
`superseded` chunk is written on an attempt's subject by the attempt that replaces it (a
retry): what that attempt showed is void. The same attempt run again (its instance was lost
before it counted as an attempt) starts over at `seq` 1: a reader treats a `seq` that goes
back as the same thing.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from chorus.messages.agents import Task
from chorus.messages.codec import Message, now

ChunkKind = Literal["delta", "tool_started", "tool_finished", "final", "superseded"]


class StreamChunk(Message, tag="stream_chunk", omit_defaults=True):
    """One piece of a task attempt's live output.

    `seq` counts the chunks of one attempt from 1 (a `superseded` marker, written by the next
    attempt, has 0). `task_id` is the task's stream key: its step name in a workflow run
    (the same across the step's attempts), else its id. `stream_seq` is never sent: a reader
    sets it to the JetStream sequence the chunk was stored at, the position to resume after.
    """

    run_id: str
    task_id: str
    attempt: int
    seq: int
    kind: ChunkKind
    text: str = ""  # a delta's text; the final answer; a tool call's arguments or outcome
    tool: str = ""  # the tool of a tool_started / tool_finished chunk
    agent: str = ""
    time: float = msgspec.field(default_factory=now)
    stream_seq: int = 0


def stream_key(task: Task) -> str:
    """The token that names a task's live stream: what its attempts have in common."""
    return task.step or task.task_id
