"""The live output of tasks in the terminal: `chorus req --stream`, `chorus run`, `chorus tail`.

- `TextPrinter` writes one task's text as it comes (for `req --stream`: deltas as they are,
  tool calls and retries on lines of their own);
- `StepLines` turns a run's chunks into whole lines per step (`chorus run` without a
  terminal);
- `Condenser` keeps `chorus tail` readable: a task's deltas are gathered into one line,
  printed when a line's worth has come or when something else happens to the task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import msgspec

from chorus.client.streams import ChunkReader
from chorus.messages import StreamChunk

LINE_CHARS = 100  # of gathered deltas `chorus tail` prints as one line
DRAIN_TIMEOUT_S = 5.0  # for the last chunks once the answer is in


def _one_line(text: str, width: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def chunk_summary(chunk: StreamChunk, width: int = 100, *, seqs: str = "") -> str:
    """One line for a chunk: `task#attempt.seq kind [tool] 'text'`."""
    head = f"{chunk.task_id}#{chunk.attempt}.{seqs or chunk.seq} {chunk.kind}"
    if chunk.tool:
        head += f" {chunk.tool}"
    text = _one_line(chunk.text, width)
    return f"{head} {text!r}" if text else head


class TextPrinter:
    """One task's text as it comes, on `stream`; the end of the text ends the line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.mid_line = False

    def show(self, chunk: StreamChunk) -> None:
        if chunk.kind == "delta":
            self._write(chunk.text)
            self.mid_line = not chunk.text.endswith("\n")
        elif chunk.kind == "tool_started":
            self._line(f"[{chunk.tool} {' '.join(chunk.text.split())[:80]}]")
        elif chunk.kind == "tool_finished":
            self._line(f"[{chunk.tool} done]")
        elif chunk.kind == "superseded":
            self._line(f"[attempt {chunk.attempt} superseded: {chunk.text}]")
        elif chunk.kind == "final":
            self.end()

    def end(self) -> None:
        if self.mid_line:
            self._write("\n")
            self.mid_line = False

    def _line(self, text: str) -> None:
        self.end()
        self._write(text + "\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


@dataclass
class StepLines:
    """A run's text per step as whole lines: `emit(step, line)` for each one finished."""

    emit: Callable[[str, str], None]
    pending: dict[tuple[str, int], str] = field(default_factory=dict)

    def show(self, chunk: StreamChunk) -> None:
        key = (chunk.task_id, chunk.attempt)
        if chunk.kind == "delta":
            text = self.pending.get(key, "") + chunk.text
            *done, rest = text.split("\n")
            for line in done:
                self.emit(chunk.task_id, line)
            self.pending[key] = rest
            return
        rest = self.pending.pop(key, "")
        if rest.strip():
            self.emit(chunk.task_id, rest)
        if chunk.kind == "tool_started":
            self.emit(chunk.task_id, f"[{chunk.tool}]")
        elif chunk.kind == "superseded":
            self.emit(chunk.task_id, f"[attempt {chunk.attempt} superseded]")


@dataclass
class Condenser:
    """`chorus tail`'s view of chunks: the lines to print for each (none while deltas
    gather)."""

    gathered: dict[str, list[StreamChunk]] = field(default_factory=dict)

    def lines(self, subject: str, chunk: StreamChunk) -> list[str]:
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


async def follow_chunks(reader: ChunkReader, show: Callable[[StreamChunk], None]) -> None:
    """Hand every chunk to `show` until cancelled."""
    async for chunk in reader:
        show(chunk)


async def drain(reader: ChunkReader, show: Callable[[StreamChunk], None]) -> None:
    """Hand over what is stored and not yet shown (the answer is in: all of it is stored)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            while not await reader.caught_up():
                show(await anext(reader))
