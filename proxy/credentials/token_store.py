"""Where an OAuth source keeps its tokens when more than one process uses them.

`TokenStore` is the seam: `load`, `save`, and `lock` (one refresh at a time among
everyone sharing the store, with a lease so a crashed holder cannot block the rest).
Two implementations:

- `RedisTokenStore`: replicas on several machines (`--store redis://`). The value is
  encrypted with Fernet (`--store-key-file`) and carries the workload name, the target
  origin and the issuer, checked after decryption: a value that does not decrypt with
  the key, or belongs to another workload, raises `StoreKeyMismatch`. It also holds a
  workload's whole sign-in (`login --store`; `save_signin`, `load_signin`): the same
  fields as the credentials file, encrypted and bound the same way.
- `FileTokenStore`: processes on one machine: a JSON file (mode 0600, written
  atomically) and a `filelock` next to it.

Neither ever logs, raises or reprs a token; store failures become `StateError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import StateError, StoreKeyMismatch

LOCK_POLL = 0.02  # seconds between tries for a lock another process holds


@dataclass(frozen=True, slots=True)
class TokenSet:
    """Tokens as stored. `expires_at` is wall-clock (epoch seconds); `seed` names the
    refresh token file contents the store was seeded from (a digest, never the token)."""

    access_token: str | None = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_at: float | None
    seed: str | None = None


def seed_digest(text: str) -> str:
    """A digest of a seeding file's contents: tells "the user changed the file" apart."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class TokenStore(Protocol):
    async def load(self) -> TokenSet | None:
        """The stored tokens, or None. Raises StoreKeyMismatch, StateError."""

    async def save(self, tokens: TokenSet) -> None:
        """Store `tokens` (durably, before anyone uses them). Raises StateError."""

    def lock(self, wait: float) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the refresh lock; StateError when not had within `wait` seconds."""


# --- Redis: replicas on several machines --------------------------------------------------


class RedisTokenStore:
    """Tokens in Redis, Fernet-encrypted and bound to (workload, origin, issuer)."""

    def __init__(self, client: Any, *, workload: str, origin: str, issuer: str | None,
                 key: bytes, lease: float, display: str) -> None:
        """`issuer` None: a stored sign-in names its own issuer (`run --oauth`, which
        learns it from the sign-in); the workload and origin are still checked."""
        from cryptography.fernet import Fernet

        self._client = client
        self._fernet = Fernet(key)
        self._binding = {"workload": workload, "origin": origin, "issuer": issuer}
        self._key = f"mcp-authproxy:{{{workload}}}:tokens"
        self._lock_key = f"mcp-authproxy:{{{workload}}}:refresh-lock"
        self._signin_key = f"mcp-authproxy:{{{workload}}}:signin"
        self._lease = lease
        self._display = display

    @property
    def display(self) -> str:
        """The store's URL without its password."""
        return self._display

    def encrypt(self, tokens: TokenSet) -> bytes:
        payload = {**self._binding, "access_token": tokens.access_token,
                   "refresh_token": tokens.refresh_token, "expires_at": tokens.expires_at,
                   "seed": tokens.seed}
        return self._fernet.encrypt(json.dumps(payload).encode())

    def _open(self, value: bytes, what: str) -> dict[str, Any]:
        from cryptography.fernet import InvalidToken

        try:
            data = json.loads(self._fernet.decrypt(value))
        except InvalidToken:
            raise StoreKeyMismatch(
                f"the {what} in the store do not decrypt with --store-key-file "
                "(another key wrote them)") from None
        except ValueError:
            raise StoreKeyMismatch(f"the {what} in the store are not this proxy's") from None
        for part, expected in self._binding.items():
            if not isinstance(data, dict) or (
                    expected is not None and data.get(part) != expected):
                raise StoreKeyMismatch(
                    f"the {what} in the store belong to another {part} than this one's")
        assert isinstance(data, dict)
        return data

    def decrypt(self, value: bytes) -> TokenSet:
        data = self._open(value, "tokens")
        return TokenSet(access_token=data.get("access_token"),
                        refresh_token=data.get("refresh_token"),
                        expires_at=data.get("expires_at"), seed=data.get("seed"))

    async def load(self) -> TokenSet | None:
        value = await self._io(self._client.get(self._key))
        return None if value is None else self.decrypt(value)

    async def save(self, tokens: TokenSet) -> None:
        await self._io(self._client.set(self._key, self.encrypt(tokens)))

    async def load_signin(self) -> dict[str, Any] | None:
        """The stored sign-in (the credentials file's fields), or None."""
        value = await self._io(self._client.get(self._signin_key))
        if value is None:
            return None
        data = self._open(value, "sign-in")
        signin = data.get("signin")
        if not isinstance(signin, dict) or signin.get("issuer") != data.get("issuer"):
            raise StoreKeyMismatch("the sign-in in the store is not this proxy's")
        return signin

    async def save_signin(self, signin: dict[str, Any]) -> None:
        """Store a sign-in (encrypted, bound to workload, origin and its issuer)."""
        issuer = self._binding["issuer"] or signin.get("issuer")
        payload = {**self._binding, "issuer": issuer, "signin": signin}
        value = self._fernet.encrypt(json.dumps(payload).encode())
        await self._io(self._client.set(self._signin_key, value))

    @contextlib.asynccontextmanager
    async def lock(self, wait: float) -> AsyncIterator[None]:
        # redis-py's Lock: SET NX PX with a random value, released by a Lua check-and-delete,
        # so a holder whose lease ran out never releases the next holder's lock.
        lock = self._client.lock(self._lock_key, timeout=self._lease, sleep=LOCK_POLL,
                                 blocking_timeout=max(wait, 0.001))
        if not await self._io(lock.acquire()):
            raise StateError(f"refresh lock in {self._display} held by another replica "
                             f"for more than {wait:g} s")
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # an expired lease: nothing to release
                await lock.release()

    async def _io(self, awaitable: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise StateError(f"store {self._display} unavailable: "
                             f"{type(exc).__name__}") from exc


# --- File: processes on one machine --------------------------------------------------------


class FileTokenStore:
    """Tokens in a JSON file (0600, atomic replace) with a `filelock` beside it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")

    async def load(self) -> TokenSet | None:
        def read() -> TokenSet | None:
            try:
                data = json.loads(self.path.read_bytes())
            except FileNotFoundError:
                return None
            except (OSError, ValueError) as exc:
                raise StateError(f"cannot read tokens from {self.path}") from exc
            return TokenSet(data.get("access_token"), data.get("refresh_token"),
                            data.get("expires_at"), data.get("seed"))

        return await asyncio.to_thread(read)

    async def save(self, tokens: TokenSet) -> None:
        from .token_endpoint import write_secret_atomically

        text = json.dumps({"access_token": tokens.access_token,
                           "refresh_token": tokens.refresh_token,
                           "expires_at": tokens.expires_at, "seed": tokens.seed})
        try:
            await asyncio.to_thread(write_secret_atomically, self.path, text)
        except OSError as exc:
            raise StateError(f"cannot write tokens to {self.path}: {exc.strerror}") from exc

    @contextlib.asynccontextmanager
    async def lock(self, wait: float) -> AsyncIterator[None]:
        import filelock

        lock = filelock.FileLock(self._lock_path, timeout=0, mode=0o600)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            try:
                lock.acquire()
                break
            except filelock.Timeout:
                if loop.time() >= deadline:
                    raise StateError(f"refresh lock {self._lock_path} held for more than "
                                     f"{wait:g} s") from None
                await asyncio.sleep(LOCK_POLL)
            except OSError as exc:
                raise StateError(f"cannot lock {self._lock_path}: {exc.strerror}") from exc
        try:
            yield
        finally:
            lock.release()


def read_key(path: Path | str) -> bytes:
    """The Fernet key in `--store-key-file` (checked by the config already)."""
    with open(path, "rb", opener=lambda p, f: os.open(p, f | getattr(os, "O_NOFOLLOW", 0))
              ) as handle:
        return handle.read().strip()
