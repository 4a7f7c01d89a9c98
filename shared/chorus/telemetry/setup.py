"""Switching tracing on for one process, from the standard OpenTelemetry variables.

Nothing happens unless a process asks: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or `OTEL_TRACES_EXPORTER` (`otlp`, `console`, `none`)
is set, or `CHORUS_TRACE_FILE` names a file to write every span to as one JSON line. Then,
when the SDK is installed (`pip install 'chorus-agents[otel]'`), a TracerProvider with a
BatchSpanProcessor per exporter becomes the global provider. The SDK reads the rest itself:
`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and its argument,
`OTEL_BSP_*` and the OTLP exporter's `OTEL_EXPORTER_OTLP_*`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import IO, Any

from opentelemetry import trace

log = logging.getLogger("chorus.telemetry")

Shutdown = Callable[[], None]


def wanted_exporters(env: Mapping[str, str], trace_file: str = "") -> list[str]:
    """The exporters the environment asks for: `otlp`, `console`, `file`; [] for none."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return []
    named = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    named = [e for e in named if e]
    if not named and (
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        named = ["otlp"]
    exporters = [e for e in named if e in ("otlp", "console")]
    unknown = sorted(set(named) - {"otlp", "console", "none"})
    if unknown:
        log.warning("unknown OTEL_TRACES_EXPORTER values ignored", extra={"unknown": unknown})
    if trace_file:
        exporters.append("file")
    return exporters


def configure_tracing(
    service: str, *, trace_file: str = "", env: Mapping[str, str] | None = None
) -> Shutdown | None:
    """Set the global TracerProvider when the environment asks for traces; returns what
    flushes and stops it (call it before the process exits), or None when tracing is off."""
    source = os.environ if env is None else env
    exporters = wanted_exporters(source, trace_file)
    if not exporters:
        return None
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "tracing asked for but the OpenTelemetry SDK is not installed: "
            "pip install 'chorus-agents[otel]'"
        )
        return None
    # OTEL_SERVICE_NAME (read by Resource.create) names the service when set.
    attributes = {} if source.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
    provider = TracerProvider(resource=Resource.create(attributes))
    opened: list[IO[str]] = []
    for name in exporters:
        exporter = _exporter(name, trace_file, opened)
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.debug("tracing on", extra={"service": service, "exporters": exporters})

    def shutdown() -> None:
        provider.shutdown()  # flushes what the batch processors still hold
        for stream in opened:
            stream.close()

    return shutdown


def _exporter(name: str, trace_file: str, opened: list[IO[str]]) -> Any:
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning(
                "OTLP export asked for but its exporter is not installed: "
                "pip install 'chorus-agents[otel]'"
            )
            return None
        return OTLPSpanExporter()
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    if name == "file":
        stream: IO[str] = open(trace_file, "a", encoding="utf-8")  # noqa: SIM115 - closed at shutdown
        opened.append(stream)
    else:
        stream = sys.stderr  # stdout is the CLI's output
    return ConsoleSpanExporter(out=stream, formatter=lambda span: span.to_json(indent=None) + "\n")
