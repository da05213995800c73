"""The stored sign-in: `<state-dir>/credentials/<name>.json`, and the client registrations.

A sign-in file holds tokens, so it is treated like an ssh key: the directory is 0700,
the file 0600, written atomically (temp file, fsync, rename) under a cross-process lock,
and read only when it is a regular file owned by this user with mode 0600, opened
without following a link (`O_NOFOLLOW`) and without blocking on a FIFO (`O_NONBLOCK`).
Anything else is refused with one line; a file someone else could have planted or read
is never used.

Two writers meet here: `login` (a new sign-in, always written) and a running proxy
writing back a refreshed token (`write_back`), which lands only while the file still
holds the sign-in the refresh started from: a refresh never overwrites a newer sign-in.

Registrations (RFC 7591 answers) live beside them in `clients/`, one per issuer, so a
second sign-in reuses the client instead of registering another.

This module never logs a token; `StoredSignIn`'s repr hides every secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import filelock

from .. import safe_fs
from ..errors import ProxyError, UnsafePath

FLAG = "--state-dir"  # the flag that names where the credentials live
LOCK_TIMEOUT = 10.0
MAX_FILE_BYTES = 256 * 1024


class CredentialsFileRefused(ProxyError):
    """A credentials file is unsafe or unreadable; the message is one line naming it."""


@dataclass(frozen=True, slots=True)
class StoredSignIn:
    """One workload's sign-in, as stored (the contract's keys plus bookkeeping)."""

    target_url: str
    resource: str
    issuer: str
    token_endpoint: str
    client_id: str
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False, default=None)
    client_secret: str | None = field(repr=False, default=None)
    expires_at: datetime | None = None
    scope: tuple[str, ...] = ()
    # A new id for every sign-in: a refresh's write-back lands only on the same one.
    signin_id: str = field(default_factory=lambda: secrets.token_hex(8))
    signed_in_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["scope"] = " ".join(self.scope)
        out["expires_at"] = _rfc3339(self.expires_at)
        out["signed_in_at"] = _rfc3339(self.signed_in_at)
        if self.client_secret is None:
            del out["client_secret"]
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: Path) -> StoredSignIn:
        def text(key: str, required: bool = True) -> str | None:
            value = doc.get(key)
            if value is None and not required:
                return None
            if not isinstance(value, str) or not value:
                raise CredentialsFileRefused(f"credentials file {where} has no valid {key!r}")
            return value

        scope = doc.get("scope") or ""
        return cls(
            target_url=_req(text("target_url")), resource=_req(text("resource")),
            issuer=_req(text("issuer")), token_endpoint=_req(text("token_endpoint")),
            client_id=_req(text("client_id")), access_token=_req(text("access_token")),
            refresh_token=text("refresh_token", False),
            client_secret=text("client_secret", False),
            expires_at=_parse_time(doc.get("expires_at")),
            scope=tuple(scope.split()) if isinstance(scope, str) else (),
            signin_id=text("signin_id", False) or "unknown",
            signed_in_at=_parse_time(doc.get("signed_in_at")) or datetime.fromtimestamp(0, UTC),
        )

    def refreshed(self, access_token: str, refresh_token: str | None,
                  expires_at: datetime | None, scope: tuple[str, ...] | None) -> StoredSignIn:
        """The same sign-in after a refresh (a rotated refresh token replaces the old)."""
        return replace(self, access_token=access_token,
                       refresh_token=refresh_token or self.refresh_token,
                       expires_at=expires_at, scope=scope if scope else self.scope)


@dataclass(frozen=True, slots=True)
class Registration:
    """A client registered with an issuer by Dynamic Client Registration (RFC 7591)."""

    issuer: str
    client_id: str
    redirect_uris: tuple[str, ...]
    grant_types: tuple[str, ...]
    client_secret: str | None = field(repr=False, default=None)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.client_secret is None:
            del out["client_secret"]
        return out


def _req(value: str | None) -> str:
    assert value is not None
    return value


def _rfc3339(when: datetime | None) -> str | None:
    if when is None:
        return None
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


# --- paths and the safe file I/O ------------------------------------------------------


def credentials_dir(state_dir: Path | str) -> Path:
    return Path(state_dir) / "credentials"


def signin_path(state_dir: Path | str, name: str) -> Path:
    return credentials_dir(state_dir) / f"{name}.json"


def registration_path(state_dir: Path | str, issuer: str) -> Path:
    digest = hashlib.sha256(issuer.encode()).hexdigest()[:24]
    return credentials_dir(state_dir) / "clients" / f"{digest}.json"


def _prepare_dirs(state_dir: Path, folder: Path) -> None:
    """`state_dir` is the user's own (created when missing), and `credentials/` and
    `folder` in it (`credentials/` or `credentials/clients/`) real 0700 directories
    (`safe_fs`); `UnsafePath` otherwise."""
    if not safe_fs.check_owned_dir(state_dir, flag=FLAG):
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        safe_fs.check_owned_dir(state_dir, flag=FLAG)
    for directory in dict.fromkeys((credentials_dir(state_dir), folder)):
        safe_fs.ensure_private_dir(directory, flag=FLAG)


def read_private_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, None when there is no file; refused unless it is a
    regular file owned by this user with mode 0600 (links are not followed)."""
    try:
        data = safe_fs.read_regular(path, MAX_FILE_BYTES, private=FLAG)
    except safe_fs.NotRegularFile as exc:
        raise CredentialsFileRefused(
            f"credentials file {path} is {exc.kind}, not a regular file; refusing it"
        ) from None
    except UnsafePath as exc:  # "--state-dir: PATH has mode ..." names the file here
        raise CredentialsFileRefused(
            "credentials file " + str(exc).removeprefix(f"{FLAG}: ")) from None
    except OSError as exc:
        raise CredentialsFileRefused(
            f"credentials file {path} cannot be read: {exc.strerror}") from None
    if data is None:
        return None
    if len(data) > MAX_FILE_BYTES:
        raise CredentialsFileRefused(f"credentials file {path} is too large")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise CredentialsFileRefused(f"credentials file {path} is not JSON") from None
    if not isinstance(doc, dict):
        raise CredentialsFileRefused(f"credentials file {path} is not a JSON object")
    return doc


def write_private_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Atomically replace `path` with `doc` (mode 0600)."""
    safe_fs.write_atomically(path, json.dumps(doc, indent=2).encode() + b"\n")


@contextlib.contextmanager
def locked(state_dir: Path | str, path: Path) -> Iterator[None]:
    """The cross-process lock of `path`, a file under `state_dir`'s credentials (a
    `.lock` beside it); the directories are checked (and made) first."""
    lock_path = Path(str(path) + ".lock")
    try:
        _prepare_dirs(Path(state_dir), path.parent)
        if not safe_fs.is_regular_or_missing(lock_path):
            os.unlink(lock_path)  # filelock would open a link and truncate its target
    except UnsafePath as exc:
        raise CredentialsFileRefused(str(exc)) from None
    lock = filelock.FileLock(str(lock_path), timeout=LOCK_TIMEOUT, mode=0o600)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise CredentialsFileRefused(
            f"credentials file {path} stayed locked for {LOCK_TIMEOUT:g} s") from None
    try:
        yield
    finally:
        lock.release()


# --- sign-ins -----------------------------------------------------------------------------


def load_signin(state_dir: Path | str, name: str) -> StoredSignIn | None:
    """The workload's stored sign-in; None when there is none; refused when unsafe."""
    path = signin_path(state_dir, name)
    doc = read_private_json(path)
    return None if doc is None else StoredSignIn.from_json(doc, path)


def save_signin(state_dir: Path | str, name: str, signin: StoredSignIn) -> Path:
    """A new sign-in: written whatever the file held (it is newer by definition)."""
    path = signin_path(state_dir, name)
    with locked(state_dir, path):
        # Refuse to replace something that is not ours to replace (a link, a directory).
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise CredentialsFileRefused(
                    f"credentials file {path} is not a regular file owned by you")
        write_private_json(path, signin.to_json())
    return path


def write_back(state_dir: Path | str, name: str, signin: StoredSignIn) -> bool:
    """A refreshed token: written only while the file holds the same sign-in.

    False (nothing written) when a newer sign-in, or none, is there now.
    """
    path = signin_path(state_dir, name)
    with locked(state_dir, path):
        current = read_private_json(path)
        if current is None or current.get("signin_id") != signin.signin_id:
            return False
        write_private_json(path, signin.to_json())
    return True


# --- registrations -------------------------------------------------------------------------


def load_registration(state_dir: Path | str, issuer: str) -> Registration | None:
    path = registration_path(state_dir, issuer)
    doc = read_private_json(path)
    if doc is None:
        return None
    client_id, uris = doc.get("client_id"), doc.get("redirect_uris")
    if doc.get("issuer") != issuer or not isinstance(client_id, str) or not isinstance(
            uris, list):
        return None  # not what we wrote: register anew
    secret = doc.get("client_secret")
    grants = doc.get("grant_types")
    return Registration(issuer, client_id, tuple(u for u in uris if isinstance(u, str)),
                        tuple(g for g in grants if isinstance(g, str))
                        if isinstance(grants, list) else (),
                        secret if isinstance(secret, str) else None)


def save_registration(state_dir: Path | str, registration: Registration) -> None:
    path = registration_path(state_dir, registration.issuer)
    with locked(state_dir, path):
        write_private_json(path, registration.to_json())


def forget_registration(state_dir: Path | str, issuer: str) -> None:
    path = registration_path(state_dir, issuer)
    with locked(state_dir, path), contextlib.suppress(FileNotFoundError):
        path.unlink()
