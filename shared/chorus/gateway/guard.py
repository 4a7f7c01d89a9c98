"""ASGI middleware that makes the gateway safe to run where a browser can reach it.

A web page the operator visits can send requests to a gateway on localhost; two checks stop
it before any route runs. The Host header must name the gateway (a DNS-rebinding page sends
its own name), and an Origin header, which browsers send on cross-site POSTs, must be the
gateway's own origin or one allowed with `--allowed-origin`. Every response also carries
headers that keep browsers from sniffing, framing, caching or referring it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chorus.errors import Forbidden
from chorus.gateway.responses import response_for

ANY_HOST: Final = "*"
LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})
SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",  # answers are live state and may hold run data
}


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bound_host: str) -> frozenset[str]:
    """The names a client on this machine uses, plus the address the gateway listens on
    (unless that is every interface, which no client sends as its Host)."""
    wildcard = bound_host in {"", "0.0.0.0", "::"}
    return LOCAL_HOSTS if wildcard else LOCAL_HOSTS | {bound_host.lower().strip("[]")}


def hostname(host_header: str) -> str:
    """`name:port` or `[v6]:port` -> the name (lower case, without brackets)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class HostGuard:
    """403 for a Host not allowed or a foreign Origin; the security headers on every answer."""

    def __init__(
        self, app: ASGIApp, allowed_hosts: Iterable[str], allowed_origins: Iterable[str] = ()
    ) -> None:
        self.app = app
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self.allowed_origins = frozenset(o.lower().rstrip("/") for o in allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        try:
            self.check(Headers(scope=scope))
        except Forbidden as refused:
            await response_for(refused)(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def check(self, headers: Headers) -> None:
        host = headers.get("host", "")
        if ANY_HOST not in self.allowed_hosts and hostname(host) not in self.allowed_hosts:
            raise Forbidden(
                f"this gateway does not serve the host {host[:100]!r}; the allowed hosts are "
                f"{', '.join(sorted(self.allowed_hosts))} (add one with --allowed-host, env "
                "CHORUS_GATEWAY_ALLOWED_HOSTS)"
            )
        origin = headers.get("origin")
        if origin is None:
            return
        own = urlsplit(origin).netloc.lower() == host.lower() and origin.lower() != "null"
        if not own and origin.lower().rstrip("/") not in self.allowed_origins:
            raise Forbidden(
                f"requests from web pages at {origin[:100]!r} are not allowed; allow that "
                "origin with --allowed-origin (env CHORUS_GATEWAY_ALLOWED_ORIGINS)"
            )
