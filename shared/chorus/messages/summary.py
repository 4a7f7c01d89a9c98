"""What a message on a Chorus subject says, for a person: its type, run, agent and one line.

`chorus tail` (the CLI) and the gateway's console tail (`GET /api/tail/stream`) read the
traffic the same way: `decoded` turns a payload into its typed message by the kind of its
subject (or JSON, or text), `short` and `tools_line` condense it, and a `Condenser` gathers
a task's streamed deltas into lines, so a token-by-token answer does not flood the view.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from chorus.errors import InvalidMessage
from chorus.messages import agents, control, coordination, runs, streams
from chorus.messages import headers as header_seam
from chorus.messages.codec import decode
from chorus.subjects import Subjects

# subject kind (Subjects.classify) -> the message type it carries
PAYLOAD_TYPES: Final[dict[str, type[msgspec.Struct]]] = {
    "task": agents.Task,
    "dispatch": agents.Task,
    "help": agents.HelpRequest,
    "event": agents.Event,
    "heartbeat": agents.Heartbeat,
    "status": coordination.AgentStatusChange,
    "dead_letter": coordination.DeadLetter,
    "outcome": coordination.TaskOutcome,
    "metrics": coordination.Metrics,
    "run_progress": runs.RunProgress,
    "run_submit": runs.RunRequest,
    "run_cancel": runs.RunCancel,
    "run_resume": control.RunResume,
    "stream_chunk": streams.StreamChunk,
}
LINE_CHARS: Final = 100  # of gathered deltas shown as one line


def decoded(subjects: Subjects, subject: str, payload: bytes) -> Any:
    """The message as a typed object when we know its type and it decodes, else JSON or text."""
    kind_type = PAYLOAD_TYPES.get(subjects.classify(subject) or "")
    if kind_type is not None:
        try:
            return decode(payload, kind_type)
        except InvalidMessage:
            pass
    if kind_type is None or subjects.classify(subject) == "task":
        try:
            return decode(payload, agents.Result | agents.ErrorReply)  # type: ignore[arg-type]
        except InvalidMessage:
            pass
    try:
        return json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return payload.decode(errors="replace")


def run_id_of(message: Any, received: dict[str, str] | None) -> str:
    return header_seam.read(received).run_id or str(getattr(message, "run_id", "") or "")


def agent_of(message: Any) -> str:
    for name in ("instance", "agent", "name", "source", "helper", "requester"):
        value = getattr(message, name, "")
        if isinstance(value, str) and value:
            return value
    return ""


def type_of(message: Any) -> str:
    if isinstance(message, msgspec.Struct):
        tag = message.__struct_config__.tag
        return str(tag) if tag else type(message).__name__
    return type(message).__name__


def to_builtins(message: Any) -> Any:
    return msgspec.to_builtins(message) if isinstance(message, msgspec.Struct) else message


def tools_line(message: Any) -> str:
    """The tool calls of a task's reply (or outcome), condensed: `tools: lookup x2, fetch (1
    failed)`; empty when there were none."""
    calls = getattr(message, "tool_calls", None) or getattr(
        getattr(message, "result", None), "tool_calls", None
    )
    if not calls:
        return ""
    counts: dict[str, int] = {}
    for call in calls:
        counts[call.name] = counts.get(call.name, 0) + 1
    names = ", ".join(name + (f" x{n}" if n > 1 else "") for name, n in counts.items())
    failed = sum(1 for call in calls if call.error)
    return f"tools: {names}" + (f" ({failed} failed)" if failed else "")


def one_line(text: str, width: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _readable(message: Any) -> str | None:
    """A sentence for the messages whose fields say more together than any one does."""
    if isinstance(message, runs.RunProgress):
        where = "/".join(part for part in (message.workflow, message.step) if part)
        return " ".join(part for part in (message.kind, where, message.detail) if part)
    if isinstance(message, coordination.TaskOutcome):
        tries = f"{message.attempts} attempt" + ("s" if message.attempts != 1 else "")
        said = (
            message.result.output
            if message.result is not None
            else (message.errors[-1].reason if message.errors else "")
        )
        return f"{message.status} task {message.task_id} after {tries}: {said}"
    return None


def short(message: Any, width: int = 100) -> str:
    """A one-line summary of the interesting part of a message."""
    readable = _readable(message)
    if readable is not None:
        return one_line(readable, width)
    for name in ("output", "input", "question", "answer", "reason"):
        value = getattr(message, name, None)
        if isinstance(value, str) and value:
            break
    else:
        value = getattr(message, "data", None) if isinstance(message, msgspec.Struct) else None
        if value is None:
            value = to_builtins(message)
        value = value if isinstance(value, str) else json.dumps(value, default=str)
    return one_line(str(value), width)


def chunk_summary(chunk: streams.StreamChunk, width: int = 100, *, seqs: str = "") -> str:
    """One line for a chunk: `task#attempt.seq kind [tool] 'text'`."""
    head = f"{chunk.task_id}#{chunk.attempt}.{seqs or chunk.seq} {chunk.kind}"
    if chunk.tool:
        head += f" {chunk.tool}"
    text = one_line(chunk.text, width)
    return f"{head} {text!r}" if text else head


@dataclass
class Condenser:
    """A tail's view of chunks: the lines to show for each (none while deltas gather)."""

    gathered: dict[str, list[streams.StreamChunk]] = field(default_factory=dict)

    def lines(self, subject: str, chunk: streams.StreamChunk) -> list[str]:
        held = self.gathered.setdefault(subject, [])
        if chunk.kind == "delta":
            held.append(chunk)
            if sum(len(c.text) for c in held) < LINE_CHARS:
                return []
            return [self._flush(subject)]
        out = [self._flush(subject)] if held else []
        return [*out, chunk_summary(chunk)]

    def _flush(self, subject: str) -> str:
        held = self.gathered.pop(subject)
        first, last = held[0], held[-1]
        merged = msgspec.structs.replace(first, text="".join(c.text for c in held))
        seqs = f"{first.seq}" if first is last else f"{first.seq}-{last.seq}"
        return chunk_summary(merged, LINE_CHARS + 20, seqs=seqs)
