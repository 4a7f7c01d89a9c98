"""What a gateway accepts: its keys (or none, on loopback only), hosts, origins and limits."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from chorus.errors import ConfigError
from chorus.gateway.guard import default_allowed_hosts, is_loopback
from chorus.gateway.keys import KeyRing
from chorus.gateway.limits import DEFAULT_MAX_WAITING, MAX_JSON_DEPTH


@dataclass(frozen=True)
class GatewayOptions:
    """`keys` None means no authentication; `build` allows that only on a loopback address."""

    keys: KeyRing | None
    allowed_hosts: frozenset[str]
    allowed_origins: frozenset[str] = frozenset()
    max_waiting: int = DEFAULT_MAX_WAITING
    max_json_depth: int = MAX_JSON_DEPTH

    @classmethod
    def build(
        cls,
        host: str,
        *,
        keys_file: str | None = None,
        no_auth: bool = False,
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
        max_waiting: int = DEFAULT_MAX_WAITING,
    ) -> GatewayOptions:
        """The options for a gateway listening on `host`, from its flags."""
        if no_auth and keys_file:
            raise ConfigError("give --keys (CHORUS_GATEWAY_KEYS) or --no-auth, not both")
        if no_auth and not is_loopback(host):
            raise ConfigError(
                f"--no-auth is refused on {host}: without keys, anyone who reaches that "
                "address can run workflows. Listen on 127.0.0.1 (--host) or give --keys"
            )
        if not no_auth and not keys_file:
            raise ConfigError(
                "the gateway needs API keys: give --keys FILE (env CHORUS_GATEWAY_KEYS), made "
                "with `chorus gateway key add NAME --scope read --scope execute --keys FILE`; "
                "or --no-auth when listening on 127.0.0.1 only"
            )
        if max_waiting < 1:
            raise ConfigError(f"--max-waiting must be at least 1, not {max_waiting}")
        return cls(
            keys=KeyRing.load(Path(keys_file)) if keys_file else None,
            allowed_hosts=default_allowed_hosts(host) | {h.lower() for h in allowed_hosts},
            allowed_origins=frozenset(allowed_origins),
            max_waiting=max_waiting,
        )
