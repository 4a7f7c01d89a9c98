"""JSON responses encoded by msgspec (the same JSON as on the wire), and errors as HTTP answers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from nats.errors import Error as NatsError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from chorus.errors import (
    ChorusError,
    ConfigError,
    Conflict,
    Forbidden,
    InvalidKey,
    InvalidMessage,
    NatsUnreachable,
    NoResponders,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
)
from chorus.gateway.bodies import ApiError, ApiErrorBody
from chorus.messages import encode

# Most specific first: the first class an error is an instance of gives its status.
STATUS_BY_ERROR: Final[tuple[tuple[type[ChorusError], int], ...]] = (
    (InvalidMessage, 400),
    (InvalidKey, 400),
    (ConfigError, 400),  # a wrong workflow, run id or workflow name in the request
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (PayloadTooLarge, 413),
    (UnsupportedMediaType, 415),
    (TooManyRequests, 429),
    (NatsUnreachable, 503),
    (NoResponders, 503),
    (RequestTimeout, 504),
)

# Codes of errors that only HTTP has (every other code is a ChorusError's).
HTTP_CODES: Final[Mapping[int, str]] = {
    404: NotFound.code,
    405: "method_not_allowed",
    413: PayloadTooLarge.code,
}
INTERNAL_ERROR: Final = "internal_error"
RETRY_AFTER_S: Final = 5  # for a 429: waiting requests last seconds to minutes
HEADERS_BY_ERROR: Final[tuple[tuple[type[ChorusError], Mapping[str, str]], ...]] = (
    (Unauthorized, {"WWW-Authenticate": 'Bearer realm="chorus"'}),
    (TooManyRequests, {"Retry-After": str(RETRY_AFTER_S)}),
)


class JSONResponse(Response):
    """A msgspec Struct (or builtins) as JSON."""

    media_type = "application/json"

    def __init__(
        self,
        content: Any,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        super().__init__(content, status_code, headers, self.media_type, background)

    def render(self, content: Any) -> bytes:
        return encode(content)


def error_response(
    code: str, reason: str, status: int, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        ApiErrorBody(error=ApiError(code=code, reason=reason)), status_code=status, headers=headers
    )


def status_of(exc: ChorusError) -> int:
    return next((status for kind, status in STATUS_BY_ERROR if isinstance(exc, kind)), 500)


def response_for(exc: ChorusError) -> JSONResponse:
    headers = next((h for kind, h in HEADERS_BY_ERROR if isinstance(exc, kind)), None)
    return error_response(exc.code, exc.reason, status_of(exc), headers)


async def on_chorus_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ChorusError)
    return response_for(exc)


async def on_nats_error(request: Request, exc: Exception) -> Response:
    """A NATS request failed mid-way (the connection dropped, JetStream did not answer)."""
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return error_response(
        NatsUnreachable.code,
        f"NATS did not answer ({detail}); check that nats-server (with JetStream) is running "
        "and reachable from the gateway, then retry",
        503,
    )


async def on_http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors: no such route (404), wrong method (405), body too large."""
    assert isinstance(exc, HTTPException)
    code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    if exc.status_code == 404:
        reason = f"no route {request.method} {request.url.path}; the routes are in /openapi.json"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        reason = f"{request.url.path} does not take {request.method}; it takes {allowed}"
    else:
        reason = exc.detail
    return error_response(code, reason, exc.status_code, exc.headers)


EXCEPTION_HANDLERS: Final = {
    ChorusError: on_chorus_error,
    NatsError: on_nats_error,
    HTTPException: on_http_error,
}
