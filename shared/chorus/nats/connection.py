"""Connecting to NATS the same way everywhere: credentials, TLS, reconnects, clear errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import NoServersError

from chorus.config import Settings
from chorus.errors import NatsAuthRefused, NatsTlsFailed, NatsUnreachable

log = logging.getLogger("chorus.connection")

SERVICE_CONNECT_WAIT = 30.0

ClosedHandler = Callable[[str], None]
"""Told why a service's connection closed for good (nats-py will not reconnect it)."""


def redact_url(url: str) -> str:
    """`url` (one or a comma-separated list) without passwords or tokens, for logs and errors."""
    return ",".join(_redact_one(u.strip()) for u in url.split(",") if u.strip())


def _redact_one(url: str) -> str:
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    if "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, has_password, _ = userinfo.partition(":")
    # A lone userinfo is a token: the secret itself.
    shown = f"{user}:***" if has_password else "***"
    return urlunsplit(parts._replace(netloc=f"{shown}@{host}"))


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not (settings.tls_ca or settings.tls_cert):
        return None
    context = ssl.create_default_context(cafile=settings.tls_ca)
    if settings.tls_cert:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


def connect_options(
    settings: Settings,
    name: str,
    *,
    service: bool,
    reconnected: asyncio.Event | None = None,
    closed: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    async def on_error(exc: Exception) -> None:
        # A command line tool reports an unreachable server once, as an error, not per attempt.
        log.log(
            logging.WARNING if service else logging.DEBUG,
            "nats error",
            extra={"client": name, "error": str(exc)},
        )

    async def on_disconnect() -> None:
        log.info("disconnected from nats", extra={"client": name})

    async def on_reconnect() -> None:
        log.info("reconnected to nats", extra={"client": name})
        if reconnected is not None:
            reconnected.set()

    options: dict[str, Any] = {
        "servers": [u.strip() for u in settings.nats_url.split(",") if u.strip()],
        "name": name,
        "error_cb": on_error,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnect,
        "closed_cb": closed,
        "connect_timeout": 2,
        # Services keep trying forever; the default gives up after about two minutes.
        "max_reconnect_attempts": -1 if service else 3,
        "reconnect_time_wait": 0.5,
        "user": settings.nats_user,
        "password": settings.nats_password,
        "token": settings.nats_token,
        "user_credentials": settings.nats_creds,
        "nkeys_seed": settings.nats_nkey_seed,
        "inbox_prefix": settings.nats_inbox_prefix,
        "tls": _tls_context(settings),
    }
    return {k: v for k, v in options.items() if v is not None}


async def connect(
    settings: Settings,
    name: str,
    *,
    service: bool = False,
    reconnected: asyncio.Event | None = None,
    on_closed: ClosedHandler | None = None,
) -> Client:
    """Connect, retrying for `settings.connect_wait` seconds; raise NatsUnreachable after,
    NatsAuthRefused at once when the server refuses our credentials, NatsTlsFailed when the
    TLS handshake fails. `reconnected`, if given, is set each time the client has
    reconnected after losing the server. `on_closed` (services) is told the reason once the
    established connection is closed for good: nats-py closes the client on some server
    errors instead of reconnecting, and a service must not carry on without NATS."""
    connected: list[Client] = []

    async def on_close() -> None:
        if not connected:
            return  # a failed attempt, reported by connect() itself
        nc = connected[0]
        reason = str(nc.last_error) if nc.last_error else "closed by this process"
        if on_closed is not None:
            on_closed(reason)
        else:
            log.info("nats connection closed", extra={"client": name, "reason": reason})

    options = connect_options(
        settings, name, service=service, reconnected=reconnected, closed=on_close
    )
    report = options["error_cb"]

    reported: list[Exception] = []  # the last error nats-py reported, for the final message

    async def on_error(exc: Exception) -> None:
        reported[:] = [exc]
        await report(exc)
        # Refused while reconnecting: our user was removed or its key rotated. nats-py would
        # retry that for ever; the process is as good as closed (its stop() closes it).
        reconnecting = connected and not (connected[0].is_connected or connected[0].is_closed)
        if reconnecting and _is_auth_violation(exc) and on_closed is not None:
            on_closed(f"the server refused this process's credentials on reconnect ({exc})")

    options["error_cb"] = on_error
    # The first connection is bounded (services wait SERVICE_CONNECT_WAIT unless told
    # otherwise, so a container may start before NATS); once connected, a service
    # reconnects for ever.
    reconnects = options["max_reconnect_attempts"]
    options["max_reconnect_attempts"] = 1
    wait = settings.connect_wait or (SERVICE_CONNECT_WAIT if service else 0.0)
    deadline = time.monotonic() + wait
    delay = 0.1
    while True:
        try:
            nc = await _connect_unless_refused(options, settings)
            nc.options["max_reconnect_attempts"] = reconnects
            connected.append(nc)
            return nc
        except ssl.SSLError as exc:
            raise _tls_failed(settings, exc) from None
        except (TimeoutError, NoServersError, OSError) as exc:
            if time.monotonic() + delay > deadline:
                # The server hung up mid-handshake: a reset, or an end of stream.
                cut = (ConnectionError, nats.errors.UnexpectedEOF)
                reset = bool(reported) and isinstance(reported[-1], cut)
                if reset and _uses_tls(settings):
                    raise _tls_reset(settings) from None
                raise NatsUnreachable(
                    f"cannot reach NATS at {redact_url(settings.nats_url)} "
                    f"({exc.__class__.__name__}): "
                    "start a local system with `chorus up`, or set NATS_URL to a running server"
                ) from None
            log.info(
                "waiting for nats",
                extra={"url": redact_url(settings.nats_url), "retry_in": delay},
            )
            await asyncio.sleep(delay)  # backoff between connection attempts
            delay = min(delay * 2, 2.0)


async def _connect_unless_refused(options: dict[str, Any], settings: Settings) -> Client:
    """nats-py retries a refused login for ever when reconnects are unlimited, and waits
    for ever after a failed TLS handshake: stop both."""
    refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
    report = options["error_cb"]

    async def on_error(exc: Exception) -> None:
        if (_is_auth_violation(exc) or isinstance(exc, ssl.SSLError)) and not refused.done():
            refused.set_result(exc)
        await report(exc)

    connecting = asyncio.ensure_future(nats.connect(**{**options, "error_cb": on_error}))
    racing: set[asyncio.Future[Any]] = {connecting, refused}
    await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
    if connecting.done():
        return connecting.result()
    connecting.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await connecting
    if isinstance(refused.result(), ssl.SSLError):
        raise refused.result()
    who = settings.nats_user or (
        "the credentials in NATS_CREDS"
        if settings.nats_creds
        else f"the nkey in {settings.nats_nkey_seed}"
        if settings.nats_nkey_seed
        else ""
    )
    raise NatsAuthRefused(
        f"NATS at {redact_url(settings.nats_url)} refused {who or 'this client'}: check "
        "NATS_USER and NATS_PASSWORD, NATS_TOKEN, NATS_CREDS or NATS_NKEY_SEED"
    )


def _is_auth_violation(exc: Exception) -> bool:
    return "authorization violation" in str(exc).lower()


def _tls_failed(settings: Settings, exc: ssl.SSLError) -> NatsTlsFailed:
    """One line that says what to set: the CA for the server's certificate, our own cert."""
    verify = getattr(exc, "verify_message", None)
    why = f"certificate verify failed: {verify}" if verify else exc.reason or str(exc)
    return NatsTlsFailed(
        f"TLS with NATS at {redact_url(settings.nats_url)} failed ({why}): set NATS_TLS_CA to "
        "the CA that signed the server's certificate, and NATS_TLS_CERT and NATS_TLS_KEY when "
        "the server requires client certificates"
    )


def _uses_tls(settings: Settings) -> bool:
    return bool(settings.tls_ca or settings.tls_cert) or settings.nats_url.startswith("tls://")


def _tls_reset(settings: Settings) -> NatsTlsFailed:
    """The server reset the connection during the TLS handshake: in TLS 1.3 a server that
    requires client certificates refuses one without after the handshake, and the client
    sees either the alert or only the reset, depending on timing."""
    return NatsTlsFailed(
        f"TLS with NATS at {redact_url(settings.nats_url)} failed (the server closed the "
        "connection during the handshake): set NATS_TLS_CERT and NATS_TLS_KEY when the "
        "server requires client certificates, and NATS_TLS_CA to the CA that signed the "
        "server's certificate"
    )


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a library swallowed.

    Python 3.11's `asyncio.wait_for` returns the result instead of raising when the awaited
    future completes in the same loop turn as the cancellation (nats-py's request uses it),
    and nats-py's `_flush_pending` catches `CancelledError`. The task then still counts the
    cancellation (`cancelling()`); call this before any long wait.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def subscribe(nc: Client, subject: str, **options: Any) -> Subscription:
    """`nc.subscribe`, but a cancellation that arrives meanwhile is not lost.

    nats-py's `_flush_pending` swallows `CancelledError` (nats-py 2.16), so a task cancelled
    while subscribing would carry on as if nothing happened and then wait for ever.
    """
    subscription = await nc.subscribe(subject, **options)
    try:
        raise_if_cancelled()
    except asyncio.CancelledError:
        await subscription.unsubscribe()
        raise
    return subscription
