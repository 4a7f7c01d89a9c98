"""Access logs, request metrics and a span for every HTTP request, and a JSON 500 for the
unexpected."""

from __future__ import annotations

import logging
import time
from typing import Final

from opentelemetry.trace import Span, SpanKind
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chorus.gateway.responses import INTERNAL_ERROR, error_response
from chorus.telemetry import tracing
from chorus.telemetry.metrics import GatewayInstruments

log = logging.getLogger("chorus.gateway")

UNMATCHED: Final = "unmatched"  # the route label of requests no route took (404s)


def _traceparent(scope: Scope) -> dict[str, str]:
    """A caller's W3C trace context from the request headers, so its trace goes on here."""
    wanted = {b"traceparent", b"tracestate"}
    return {k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in wanted}


class AccessLog:
    """ASGI middleware: one structured log line, the request metrics and a SERVER span
    (`<method> <route>`, a child of the caller's `traceparent`) per request.

    It sits inside Starlette's outermost error middleware, so an unexpected exception is
    answered here with a JSON 500 (the traceback goes to the log, never to the client).
    """

    def __init__(self, app: ASGIApp, metrics: GatewayInstruments) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with tracing.span(
            f"{scope['method']} {scope['path']}",
            kind=SpanKind.SERVER,
            parent=tracing.parent_of(_traceparent(scope)),
            attributes={"http.request.method": scope["method"], "url.path": scope["path"]},
        ) as span:
            await self._serve(scope, receive, send, span)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, span: Span) -> None:
        started = time.perf_counter()
        status = 0

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            log.exception(
                "request failed", extra={"method": scope["method"], "path": scope["path"]}
            )
            if status:  # the response had started: nothing more can be said to the client
                raise
            response = error_response(
                INTERNAL_ERROR, "the gateway failed on this request; its log has the details", 500
            )
            await response(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", UNMATCHED)
            duration = time.perf_counter() - started
            self.metrics.add(template, scope["method"], status, duration)
            # The route template names the span (the path has run ids in it).
            span.update_name(f"{scope['method']} {template}")
            span.set_attribute("http.route", template)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                tracing.mark_failed(str(status), f"HTTP {status}", span)
            client = scope.get("client")
            log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": template,
                    "status": status,
                    "duration_ms": round(duration * 1000, 3),
                    "client": f"{client[0]}:{client[1]}" if client else "",
                    "api_key": scope.get("state", {}).get("api_key", ""),  # its name (auth.py)
                },
            )
