"""Times the CLI prints and reads: ISO 8601 UTC with milliseconds out; an ISO time or a
duration back from now (`10m`, `2h`, `1d12h`) in."""

from __future__ import annotations

import argparse
import re
import time
from datetime import UTC, datetime

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def iso(timestamp: float) -> str:
    """`2026-12-02T15:59:52.441Z`; `-` for no time (0)."""
    if not timestamp:
        return "-"
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def since(text: str) -> float:
    """An argparse type: the epoch seconds `text` names, an ISO 8601 time (UTC when it has no
    offset) or a duration before now (`90s`, `10m`, `2h`, `1d12h`)."""
    text = text.strip()
    if _DURATION.sub("", text) == "" and text:
        seconds = sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION.findall(text))
        return time.time() - seconds
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (like 90s, 10m, 2h, 1d) nor an ISO 8601 time "
            "(like 2026-12-02T15:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
