"""Bounds on what one request can cost: body type, size and nesting, and requests waiting.

Each bound answers with an error naming it, before the request can hurt the gateway: a body
that decodes into a run too large for NATS (the server closes a connection that publishes one),
JSON nested deep enough to exhaust the decoder's recursion, or so many waiting requests that
their KV watchers use up the server's consumers.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Final

from starlette.requests import Request

from chorus.errors import InvalidMessage, PayloadTooLarge, TooManyRequests, UnsupportedMediaType

MAX_JSON_DEPTH: Final = 32
DEFAULT_MAX_WAITING: Final = 64
# Room on NATS beyond the request's JSON: its headers (two run ids, at most 128 characters
# each) and the run record's own fields, saved to KV beside the same workflow and input.
ENVELOPE_BYTES: Final = 4096

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")


def require_json(request: Request, *, body: bool = True) -> None:
    """415 unless the body is declared `application/json`. A route taking no body (`body`
    False) accepts none; one sent anyway must be JSON too. Browsers send forms and text/plain
    across sites without asking first; JSON they do not."""
    declared = request.headers.get("content-type")
    if declared is None and not body and request.headers.get("content-length", "0") == "0":
        return
    media_type = (declared or "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(
            f"{request.method} {request.url.path} takes `Content-Type: application/json`, "
            f"not {declared or 'a body without a Content-Type'!r}"
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to be larger than `limit`."""
    too_large = PayloadTooLarge(
        f"the request body is larger than {limit} bytes (CHORUS_MAX_MESSAGE_BYTES); "
        "pass large inputs by reference (a URL or a shared-state key) instead"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def too_deep(body: bytes, limit: int) -> bool:
    """Whether JSON `body` nests arrays and objects more than `limit` deep, found at C speed
    without decoding: strings are dropped, then innermost empty pairs peeled off, one level a
    round. Unbalanced brackets are not JSON; the decoder then says where."""
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return False
        peeled = _EMPTY_PAIR.sub(b"", brackets)
        if peeled == brackets:
            return False
        brackets = peeled
    return _EMPTY_PAIR.search(brackets) is not None


def check_depth(body: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    if too_deep(body, limit):
        raise InvalidMessage(
            f"the JSON body nests arrays and objects more than {limit} levels deep (the "
            "gateway's limit); flatten the data or pass it by reference"
        )


def check_publishable(size: int, max_payload: int) -> None:
    """413 when a run of `size` JSON bytes would not fit in one NATS message."""
    if size + ENVELOPE_BYTES > max_payload:
        raise PayloadTooLarge(
            f"the run is {size} bytes as JSON; with its headers and record it would not fit "
            f"the NATS server's max_payload of {max_payload} bytes (at most "
            f"{max_payload - ENVELOPE_BYTES} here); pass large inputs by reference instead"
        )


class WaitSlots:
    """At most `limit` requests wait for their run at once: each holds a KV watcher, which is
    a JetStream consumer, and the server allows only so many."""

    def __init__(self, limit: int = DEFAULT_MAX_WAITING) -> None:
        self.limit = limit
        self.in_use = 0

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        if self.in_use >= self.limit:
            raise TooManyRequests(
                f"{self.in_use} requests are waiting for runs already (the gateway's "
                "--max-waiting); retry later, or send wait=false and follow the run at the "
                "link in the answer"
            )
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
