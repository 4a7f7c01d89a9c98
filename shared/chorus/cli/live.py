"""The live output of tasks in the terminal: `chorus req --stream`, `chorus run`, `chorus tail`.

- `TextPrinter` writes one task's text as it comes (for `req --stream`: deltas as they are,
  tool calls and retries on lines of their own);
- `StepLines` turns a run's chunks into whole lines per step (`chorus run` without a
  terminal);
- `Condenser` (from `chorus.messages.summary`, shared with the gateway's console tail) keeps
  `chorus tail` readable: a task's deltas are gathered into one line, printed when a line's
  worth has come or when something else happens to the task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from chorus.client.streams import ChunkReader
from chorus.messages import StreamChunk
from chorus.messages.summary import Condenser, chunk_summary

__all__ = ["Condenser", "StepLines", "TextPrinter", "chunk_summary", "drain", "follow_chunks"]

DRAIN_TIMEOUT_S = 5.0  # for the last chunks once the answer is in


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
