"""Text from the wire made safe for a terminal: heartbeats, run input and output are
written by other processes (or whoever may publish), so they must not move the cursor,
retitle the window or inject rich markup into a table."""

from __future__ import annotations

import re
from typing import TextIO

from rich.markup import escape

# C0 controls but tab and newline, DEL, C1 controls (ESC starts every escape sequence; C1
# CSI is one byte), and the bidirectional overrides that make text read other than it is.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _shown(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}" if ord(match.group()) < 0x100 else "\ufffd"


def plain(text: str) -> str:
    """`text` with control characters shown as `\\xNN`, never sent to the terminal."""
    return _CONTROLS.sub(_shown, text)


def one_line(text: str) -> str:
    """`plain`, and newlines shown too: for table cells and one-line fields."""
    return plain(text).replace("\n", "\\n").replace("\t", " ")


def safe(text: str) -> str:
    """For rich markup strings and tables: control characters shown, markup escaped."""
    return escape(plain(text))


def for_stream(text: str, stream: TextIO) -> str:
    """Raw for a pipe or file (the exact output), `plain` for a terminal."""
    return plain(text) if stream.isatty() else text
