"""Nkey credentials: a seed file per principal (secret, mode 0600) and its public key.

The server config holds only public keys; a client proves it holds the seed by signing the
server's nonce (nats-py `nkeys_seed=`), so a captured connection cannot be replayed.
"""

from __future__ import annotations

import os
from pathlib import Path

import nkeys

from chorus.errors import ConfigError


def new_seed() -> bytes:
    """A fresh user nkey seed (`SU...`)."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def public_key(seed: bytes) -> str:
    """The user's public key (`U...`), what the server config names."""
    try:
        key = nkeys.from_seed(bytearray(seed.strip())).public_key
    except nkeys.NkeysError as exc:
        raise ConfigError(f"not an nkey seed: {type(exc).__name__}") from None
    return bytes(key).decode()


def write_seed(path: Path, seed: bytes) -> None:
    """Write a seed readable by its owner only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as sink:
        sink.write(seed + b"\n")
    path.chmod(0o600)


def load_or_create_seed(path: Path, *, rotate: bool = False) -> bytes:
    """Keep an existing seed (so regenerating the config does not log everyone out)."""
    if path.is_file() and not rotate:
        seed = path.read_bytes().strip()
        public_key(seed)  # a readable error now rather than a refused login later
        return seed
    seed = new_seed()
    write_seed(path, seed)
    return seed


def write_env(path: Path, values: dict[str, str]) -> None:
    """A `KEY=value` file for `docker compose --env-file`, systemd or `set -a; . file`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
