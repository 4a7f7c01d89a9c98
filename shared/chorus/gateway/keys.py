"""API keys for the gateway: made here, kept on disk only as salted hashes, checked per request.

A keys file holds one JSON object a line: `{"name", "salt", "hash", "scopes", "created_at"}`,
where `hash` is HMAC-SHA256 of the key under the key's own random salt. A key is 32 random
bytes, so a fast hash is enough (nothing to brute-force) and checking one costs microseconds.
The plain key is shown once, when it is made (`chorus gateway key add`), and never stored here.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final, Literal, get_args

import msgspec

from chorus.errors import ConfigError
from chorus.messages import now
from chorus.subjects import check_token

Scope = Literal["read", "execute", "admin"]
SCOPES: Final[tuple[Scope, ...]] = get_args(Scope)
KEY_PREFIX: Final = "chorus_"  # makes a leaked key easy to recognise (and to scan for)
KEYS_FILE: Final = "gateway-keys.jsonl"  # the hashes, in `chorus up`'s data dir
KEY_FILE: Final = "gateway.key"  # the plain key `chorus up` made for its operator


class StoredKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One line of a keys file."""

    name: str
    salt: str  # hex
    hash: str  # hex HMAC-SHA256(salt, key)
    scopes: list[Scope]
    created_at: float = 0.0

    def matches(self, key: str) -> bool:
        return hmac.compare_digest(self.hash, digest(key, bytes.fromhex(self.salt)))

    def allows(self, scope: Scope) -> bool:
        return "admin" in self.scopes or scope in self.scopes


def digest(key: str, salt: bytes) -> str:
    return hmac.new(salt, key.encode(), hashlib.sha256).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def stored(name: str, key: str, scopes: Iterable[Scope]) -> StoredKey:
    salt = secrets.token_bytes(16)
    return StoredKey(
        name=check_token(name, "key name"),
        salt=salt.hex(),
        hash=digest(key, salt),
        scopes=sorted(set(scopes), key=SCOPES.index),
        created_at=now(),
    )


_decoder = msgspec.json.Decoder(StoredKey)
_encoder = msgspec.json.Encoder()


def read_keys(path: Path) -> list[StoredKey]:
    """The keys in `path`; ConfigError naming the line that is wrong."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the gateway keys file {path}: {exc.strerror or exc}; create it with "
            f"`chorus gateway key add NAME --scope read --keys {path}`"
        ) from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            keys.append(_decoder.decode(line))
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{path}, line {number}: not a stored key ({exc})") from None
    return keys


def write_keys(path: Path, keys: Sequence[StoredKey]) -> None:
    """Replace `path` at once (never half-written), readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.writelines(_encoder.encode(key) + b"\n" for key in keys)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def add_key(path: Path, name: str, scopes: Iterable[Scope]) -> str:
    """Make a key called `name`, store its hash in `path` (created when missing) and return
    the plain key: the only time anyone sees it."""
    scopes = list(scopes)
    if not scopes:
        raise ConfigError("give the key at least one --scope: read, execute or admin")
    keys = read_keys(path) if path.exists() else []
    if any(k.name == name for k in keys):
        raise ConfigError(f"{path} has a key called {name!r} already; remove it first")
    key = new_key()
    write_keys(path, [*keys, stored(name, key, scopes)])
    return key


def remove_key(path: Path, name: str) -> None:
    keys = read_keys(path)
    if not any(k.name == name for k in keys):
        raise ConfigError(f"{path} has no key called {name!r}")
    write_keys(path, [k for k in keys if k.name != name])


def local_key(data_dir: Path) -> tuple[Path, Path]:
    """For `chorus up`: the keys file and the plain admin key beside it in `data_dir`, both
    mode 0600, made on the first run and kept after. Returns (keys file, key file)."""
    keys_file, key_file = data_dir / KEYS_FILE, data_dir / KEY_FILE
    if key_file.is_file() and keys_file.is_file():
        key = key_file.read_text().strip()
        if any(k.matches(key) for k in read_keys(keys_file)):
            return keys_file, key_file
    others = [k for k in read_keys(keys_file) if k.name != "local"] if keys_file.is_file() else []
    key = new_key()
    write_keys(keys_file, [*others, stored("local", key, ["admin"])])
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    os.chmod(key_file, 0o600)  # O_CREAT's mode applies only to a new file
    return keys_file, key_file


class KeyRing:
    """The keys a gateway accepts, loaded once at start (restart it to pick up changes)."""

    def __init__(self, keys: Sequence[StoredKey]) -> None:
        self.keys = tuple(keys)

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        keys = read_keys(path)
        if not keys:
            raise ConfigError(
                f"the gateway keys file {path} holds no keys; add one with "
                f"`chorus gateway key add NAME --scope read --keys {path}`"
            )
        return cls(keys)

    def find(self, key: str) -> StoredKey | None:
        """The stored key `key` is, checking every one (the time taken says nothing)."""
        found = None
        for candidate in self.keys:
            if candidate.matches(key):
                found = candidate
        return found
