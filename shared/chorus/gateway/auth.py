"""Who is asking and what they may do: `Authorization: Bearer <key>` and the key's scopes.

`read` is for the GET routes, `execute` for submitting and cancelling runs, `admin` for
everything. The caller's key name goes into the request's state, so the access log says who.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from chorus.errors import Forbidden, Unauthorized
from chorus.gateway.keys import KeyRing, Scope, StoredKey

Endpoint = Callable[[Request], Awaitable[Response]]
HOW = "send `Authorization: Bearer <key>`; an operator makes keys with `chorus gateway key add`"


class Authenticator:
    """Checks requests against a KeyRing; with None (`--no-auth`, loopback only) lets all in."""

    def __init__(self, keys: KeyRing | None) -> None:
        self.keys = keys

    def caller(self, request: Request) -> StoredKey | None:
        """The key the request carries, None when it carries none; Unauthorized for a
        malformed or unknown one (even on a route that needs none: a wrong key is a mistake
        worth hearing about)."""
        header = request.headers.get("authorization")
        if header is None or self.keys is None:
            return None
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized(f"the Authorization header is not `Bearer <key>`; {HOW}")
        found = self.keys.find(key.strip())
        if found is None:
            raise Unauthorized(f"this gateway does not know that API key; {HOW}")
        request.state.api_key = found.name
        return found

    def may(self, request: Request, scope: Scope) -> bool:
        """Whether the request may do what `scope` allows (without failing when it may not)."""
        if self.keys is None:
            return True
        caller = self.caller(request)
        return caller is not None and caller.allows(scope)

    def check(self, request: Request, scope: Scope) -> None:
        if self.keys is None:
            return
        caller = self.caller(request)
        if caller is None:
            raise Unauthorized(
                f"{request.url.path} needs an API key with the `{scope}` scope; {HOW}"
            )
        if not caller.allows(scope):
            raise Forbidden(
                f"the key {caller.name!r} has the scopes {', '.join(caller.scopes)}; "
                f"{request.method} {request.url.path} needs `{scope}` (or `admin`)"
            )

    def protect(self, endpoint: Endpoint, scope: Scope) -> Endpoint:
        """`endpoint`, answered only for keys with `scope`."""

        async def protected(request: Request) -> Response:
            self.check(request, scope)
            return await endpoint(request)

        protected.__name__ = protected.__qualname__ = getattr(endpoint, "__name__", "endpoint")
        return protected
