"""The CLI side of the wire: the message type of each subject, payload input, summaries."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from chorus import messages
from chorus.errors import ConfigError, InvalidMessage
from chorus.messages import decode, headers
from chorus.subjects import Subjects

# subject kind (Subjects.classify) -> the message type it carries
PAYLOAD_TYPES: dict[str, type[msgspec.Struct]] = {
    "task": messages.Task,
    "dispatch": messages.Task,
    "help": messages.HelpRequest,
    "event": messages.Event,
    "heartbeat": messages.Heartbeat,
    "status": messages.AgentStatusChange,
    "dead_letter": messages.DeadLetter,
    "outcome": messages.TaskOutcome,
    "metrics": messages.Metrics,
    "run_progress": messages.RunProgress,
    "run_submit": messages.RunRequest,
    "run_cancel": messages.RunCancel,
    "stream_chunk": messages.StreamChunk,
}
# Subjects whose requests carry no message of their own: the type above is the reply's.
REPLY_ONLY: frozenset[str] = frozenset({"metrics"})


def read_payload(argument: str | None) -> bytes:
    """DATA as given, `@file` for a file's contents, `-` for standard input, nothing for empty."""
    if argument is None:
        return b""
    if argument == "-":
        return sys.stdin.buffer.read()
    if argument.startswith("@"):
        path = Path(argument[1:])
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return argument.encode()


def prepare(subjects: Subjects, subject: str, payload: bytes) -> bytes:
    """Validate a payload for a Chorus subject (naming the wrong field) and normalise it.

    On an event subject a payload that is not already an Event becomes the event's `data`.
    """
    kind = subjects.classify(subject)
    if kind is None or kind in REPLY_ONLY:
        return payload
    if kind == "event":
        topic = subjects.topic_of(subject)
        try:
            raw = json.loads(payload or b"null")
        except json.JSONDecodeError as exc:
            raise InvalidMessage(f"event data is not JSON: {exc}") from None
        if isinstance(raw, dict) and raw.get("type") == "event":
            event = decode(payload, messages.Event)
            return messages.encode(msgspec.structs.replace(event, topic=topic))
        return messages.encode(messages.Event(topic=topic, data=raw))
    kind_type = PAYLOAD_TYPES.get(kind)
    if kind_type is None:
        return payload
    return messages.encode(decode(payload, kind_type))


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
            return decode(payload, messages.Result | messages.ErrorReply)  # type: ignore[arg-type]
        except InvalidMessage:
            pass
    try:
        return json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return payload.decode(errors="replace")


def run_id_of(message: Any, received: dict[str, str] | None) -> str:
    return headers.read(received).run_id or str(getattr(message, "run_id", "") or "")


def agent_of(message: Any) -> str:
    for field in ("instance", "agent", "name", "source", "helper", "requester"):
        value = getattr(message, field, "")
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


def _readable(message: Any) -> str | None:
    """A sentence for the messages whose fields say more together than any one does."""
    if isinstance(message, messages.RunProgress):
        where = "/".join(part for part in (message.workflow, message.step) if part)
        return " ".join(part for part in (message.kind, where, message.detail) if part)
    if isinstance(message, messages.TaskOutcome):
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
        text = " ".join(readable.split())
        return text if len(text) <= width else text[: width - 1] + "…"
    for field in ("output", "input", "question", "answer", "reason"):
        value = getattr(message, field, None)
        if isinstance(value, str) and value:
            break
    else:
        value = getattr(message, "data", None) if isinstance(message, msgspec.Struct) else None
        if value is None:
            value = to_builtins(message)
        value = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"
