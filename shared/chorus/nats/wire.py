"""The one place Chorus sends from: publish, request, respond, JetStream publish.

Every message leaves through these functions with headers built by `chorus.messages.headers`,
so what every message should carry (trace context, a caller identity, a deadline) is added in
`outgoing` and nowhere else. Each send is checked against the server's max payload with its
headers counted (nats-py counts only the body, and the server drops the whole connection
for a message over the limit), so an oversized message is a `PayloadTooLarge` for the one
sender, never a process cut off from NATS.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NoStreamResponseError
from nats.micro.request import Request

from chorus.errors import PayloadTooLarge
from chorus.messages.headers import MSG_ID_HEADER, Headers
from chorus.nats import propagation

# Room the protocol line (PUB/HPUB, subject, reply inbox, sizes) takes beside the payload.
_PROTOCOL_SLACK = 256


def outgoing(headers: Mapping[str, str] | None) -> Headers | None:
    """The headers a message leaves with: the caller's own, plus those every message carries.

    The seam for cross-cutting headers: tracing (W3C `traceparent`), caller identity and
    deadlines are added here, once, for every publish, request and reply.
    """
    sent = dict(headers) if headers else {}
    propagation.inject(sent)  # the sender's current span, when tracing is on
    return sent or None


def _size(subject: str, payload: bytes, headers: Mapping[str, str] | None) -> int:
    header_bytes = sum(len(k) + len(v) + 4 for k, v in (headers or {}).items())
    return len(subject) + len(payload) + header_bytes + (12 if headers else 0)


def check_size(nc: Client, subject: str, payload: bytes, headers: Mapping[str, str] | None) -> None:
    """PayloadTooLarge when the message would not fit the server's max payload."""
    limit = nc.max_payload - _PROTOCOL_SLACK
    size = _size(subject, payload, headers)
    if size > limit:
        raise PayloadTooLarge(
            f"a message of {size} bytes (body and headers) to {subject[:80]} is over the "
            f"server's limit of {limit}; put large inputs in the state store and send a key"
        )


async def publish(
    nc: Client,
    subject: str,
    payload: bytes,
    headers: Mapping[str, str] | None = None,
    *,
    reply: str = "",
) -> None:
    sent = outgoing(headers)
    check_size(nc, subject, payload, sent)
    await nc.publish(subject, payload, reply=reply, headers=sent)


async def request(
    nc: Client,
    subject: str,
    payload: bytes,
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float,
) -> Msg:
    sent = outgoing(headers)
    check_size(nc, subject, payload, sent)
    return await nc.request(subject, payload, timeout=timeout, headers=sent)


async def respond(
    to: Request | Msg, payload: bytes, headers: Mapping[str, str] | None = None
) -> bool:
    """Answer a request (a micro endpoint's or a plain message's); False when it had no
    reply subject. A reply too large for the server becomes `PayloadTooLarge`, so the caller
    can answer with that error instead."""
    msg = to._msg if isinstance(to, Request) else to
    if not msg.reply:
        return False
    sent = outgoing(headers)
    check_size(msg._client, msg.reply, payload, sent)
    await msg._client.publish(msg.reply, payload, headers=sent)
    return True


async def gather(
    nc: Client,
    subject: str,
    *,
    timeout: float,
    until: Callable[[Msg], bool] | None = None,
) -> list[Msg]:
    """Scatter-gather: publish an empty request to `subject` and collect every reply within
    `timeout` (NATS micro discovery, where nobody knows how many will answer), or fewer:
    `until(reply)` is called with each and ends the wait when it returns True."""
    inbox = nc.new_inbox()
    replies: list[Msg] = []
    subscription = await nc.subscribe(inbox)
    try:
        await publish(nc, subject, b"", reply=inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                reply = await subscription.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            replies.append(reply)
            if until is not None and until(reply):
                break
    finally:
        await subscription.unsubscribe()
    return replies


async def js_publish(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float = 5.0,
) -> PubAck:
    """One JetStream publish (raises as nats-py does: APIError when a condition fails)."""
    sent = outgoing(headers)
    check_size(js._nc, subject, payload, sent)
    return await js.publish(subject, payload, headers=sent, timeout=timeout)


# While a server restarts (or a cluster elects a leader) a JetStream publish can time out or
# find no responder. A publish carrying `Nats-Msg-Id` can be retried safely: the stream drops
# the duplicate. These are the errors worth retrying.
TRANSIENT = (nats.errors.TimeoutError, nats.errors.NoRespondersError, NoStreamResponseError)
# One attempt's wait for the stream's ack. A stream whose cluster leader died answers nothing
# until a new one is elected (seconds): short attempts land soon after it is, where 5 s ones
# arrived up to 5 s late.
ATTEMPT_TIMEOUT_S = 1.0


async def publish_durably(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    headers: Mapping[str, str],
    *,
    within: float = 30.0,
) -> PubAck:
    """Publish until the stream acknowledges it (or `within` seconds pass); needs Nats-Msg-Id."""
    assert MSG_ID_HEADER in headers, "only a de-duplicated publish can be retried"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    delay = 0.1
    while True:
        try:
            return await js_publish(js, subject, payload, headers, timeout=ATTEMPT_TIMEOUT_S)
        except TRANSIENT:
            if loop.time() + delay > deadline:
                raise
            await asyncio.sleep(delay)  # backoff while the server comes back
            delay = min(delay * 2, 2.0)
