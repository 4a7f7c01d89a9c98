"""Access logs and request counts for every HTTP request, and a JSON 500 for the unexpected."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chorus.gateway.responses import INTERNAL_ERROR, error_response

log = logging.getLogger("chorus.gateway")

UNMATCHED: Final = "unmatched"  # the route label of requests no route took (404s)


class RequestCounts:
    """`chorus_http_requests_total`: requests by route template, method and status.

    Labelled by the route's template (`/api/runs/{run_id}`), never the raw path, so the
    number of series stays bounded whatever clients ask for.
    """

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str, str]] = Counter()

    def add(self, route: str, method: str, status: int) -> None:
        self._counts[(route, method, str(status))] += 1

    def items(self) -> list[tuple[tuple[str, str, str], int]]:
        return sorted(self._counts.items())


class AccessLog:
    """ASGI middleware: one structured log line and one count per request.

    It sits inside Starlette's outermost error middleware, so an unexpected exception is
    answered here with a JSON 500 (the traceback goes to the log, never to the client).
    """

    def __init__(self, app: ASGIApp, counts: RequestCounts) -> None:
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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
            self.counts.add(template, scope["method"], status)
            client = scope.get("client")
            log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": template,
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    "client": f"{client[0]}:{client[1]}" if client else "",
                    "api_key": scope.get("state", {}).get("api_key", ""),  # its name (auth.py)
                },
            )
