"""Structured logging: one JSON object per line on stderr, with the `extra` fields of each call.

Each line has `ts` (ISO 8601, UTC, milliseconds: `2026-12-01T09:30:00.123Z`), `level`,
`logger`, `msg`, and `trace_id` and `span_id` while an OpenTelemetry span is current, so a log
line can be found from its trace and the other way round.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from typing import Any

from opentelemetry import trace

# Record attributes that are not `extra` fields (uvicorn adds `color_message`, a duplicate).
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


def iso_utc(created: float) -> str:
    """`created` (seconds since the epoch) as ISO 8601 in UTC with milliseconds."""
    moment = datetime.datetime.fromtimestamp(created, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def trace_fields() -> dict[str, str]:
    """`trace_id` and `span_id` of the current span (W3C hex); {} when none is current."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {
        "trace_id": trace.format_trace_id(context.trace_id),
        "span_id": trace.format_span_id(context.span_id),
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **trace_fields(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        return f"{line} {extras}".rstrip()


def setup_logging(level: str = "INFO", *, json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("nats").setLevel(logging.WARNING)
