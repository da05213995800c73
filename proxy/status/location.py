"""Where a workload's record lives (`--store`), and the key for a shared store's tokens.

Pure parsing and checks, importable without the optional `redis` extra: `config.py`
validates with these, `redis.py` connects with what they return. A store URL may carry
a password: only `display` (password and query values masked) is ever shown or logged.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from yarl import URL

from ..log import REDACTED, register_secret

REDIS_SCHEMES = ("redis", "rediss")
KEY_HINT = ("make one with: python -c 'import base64, os; "
            "print(base64.urlsafe_b64encode(os.urandom(32)).decode())'")


@dataclass(frozen=True, slots=True)
class StoreLocation:
    """A parsed `--store` value. `url` may hold a password; show `display` instead."""

    kind: str  # "file" or "redis"
    url: str = field(repr=False)
    display: str

    def __repr__(self) -> str:
        return f"StoreLocation(kind={self.kind!r}, display={self.display!r})"


def redact_store_url(value: str) -> str:
    """`redis://user:<redacted>@host:6379/0`: the password and every query value masked."""
    try:
        url = URL(value)
    except (ValueError, TypeError):
        return REDACTED
    if not url.scheme or not url.raw_host:
        return value if "@" not in value and "?" not in value else REDACTED
    auth = ""
    if url.user is not None or url.password is not None:
        user = quote(url.user or "", safe="")
        auth = f"{user}:{REDACTED}@" if url.password is not None else f"{user}@"
    host = url.raw_host if ":" not in url.raw_host else f"[{url.raw_host}]"
    port = f":{url.explicit_port}" if url.explicit_port is not None else ""
    query = ("?" + "&".join(f"{k}={REDACTED}" for k in url.query)) if url.query else ""
    path = url.raw_path
    if path == "/" and not value.partition("?")[0].endswith("/"):
        path = ""  # yarl adds the root path; show what was typed
    return f"{url.scheme}://{auth}{host}{port}{path}{query}"


def parse_store(value: object) -> StoreLocation:
    """`file`, or a `redis://` / `rediss://` URL; ValueError with a one-line reason."""
    if not isinstance(value, str) or not value:
        raise ValueError("must be 'file' or a redis:// or rediss:// URL")
    if value == "file":
        return StoreLocation("file", "file", "file")
    display = redact_store_url(value)
    try:
        url = URL(value)
        url.port  # noqa: B018 - raises on a bad port
    except (ValueError, TypeError):
        raise ValueError(f"{display} is not a valid URL") from None
    if url.scheme not in REDIS_SCHEMES:
        raise ValueError(f"{display}: must be 'file' or a redis:// or rediss:// URL")
    if not url.raw_host:
        raise ValueError(f"{display}: must name a host")
    db = url.raw_path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"{display}: the path must be a database number, like /0")
    if url.fragment:
        raise ValueError(f"{display}: must not have a #fragment")
    if importlib.util.find_spec("redis") is None:
        raise ValueError("a redis store needs the optional extra: "
                         "pip install 'mcp-authproxy[redis]'")
    if url.password:
        register_secret(url.password)
    return StoreLocation("redis", value, display)


def check_key_file(path: Path) -> bytes:
    """The Fernet key in `path` (URL-safe base64 of 32 bytes, mode 0600), or ValueError."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ValueError(f"no such file: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if info.st_mode & 0o077:
            raise ValueError(f"{path} must have mode 0600 "
                             f"(it has {stat.S_IMODE(info.st_mode):04o})")
        raw = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    try:
        key = base64.urlsafe_b64decode(raw)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ValueError(f"{path} does not hold a Fernet key (32 random bytes, URL-safe "
                         f"base64); {KEY_HINT}")
    return raw
