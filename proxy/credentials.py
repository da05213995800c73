"""Outgoing credentials: one interface for every source the proxy can inject from.

A source yields a `Credential` (the `Authorization` value to send), tells the auth
monitor through its `CredentialReporter` whether it can (the `CredentialAvailable`
condition), and re-checks itself when the target answers 401. It must never log,
raise or repr the secret itself.

Implementations here: `FileBearerSource` (`--bearer-token-file`, watched and re-read
when it changes) and `EnvBearerSource` (`--bearer-token-env`); `OAuthSource` lives in
`oauth.py`. `build_credential_source` picks one from a `ProxyConfig`. A source never
exits the process: a missing or bad file only makes it unavailable until it heals.
File reads are small and synchronous on purpose: a token file is a few bytes on a
local disk, and a stat per second does not stall the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import CredentialInvalid, CredentialRetrying
from .log import get_logger

if TYPE_CHECKING:
    import aiohttp

    from .config import ProxyConfig


@dataclass(frozen=True, slots=True)
class Credential:
    """The `Authorization` header value to inject. `version` grows with every change."""

    authorization: str = field(repr=False)
    version: int

    def __repr__(self) -> str:
        return f"Credential(version={self.version}, authorization=<redacted>)"


class CredentialReporter(Protocol):
    def __call__(self, available: bool, reason: str, message: str, permanent: bool) -> None:
        """The source's state changed. `permanent`: only a change of the source heals it."""


class CredentialSource(Protocol):
    description: str  # names the source for messages ("token file /run/token"), no secret
    can_refresh: bool  # a 401 can be answered with a refresh and one replay (OAuth)

    @property
    def current_version(self) -> int | None:
        """Version of the credential in effect now, None when there is none."""

    async def start(self, report: CredentialReporter) -> None:
        """Load the credential and begin watching or refreshing it."""

    async def close(self) -> None: ...

    def ready(self) -> Credential | None:
        """The credential `get()` would return at once, or None (then await `get()`).

        The forwarding path asks this first: no coroutine per request when the
        credential is at hand, as it is almost always.
        """

    async def get(self) -> Credential:
        """The credential to send now. No I/O when one is cached and fresh.

        Raises `CredentialUnavailable` (503 + Retry-After) when none can be had within
        `credential_wait`.
        """

    async def after_unauthorized(self, used: Credential) -> Credential | None:
        """The target answered 401 to `used`: re-check the source (file changed? refresh).

        Returns a different credential when one is now available, else None. At most one
        refresh runs at a time; when the version already moved past `used`, the current
        credential is returned without a new refresh.
        """


# --- Shared file helpers (also used by the OAuth source) ----------------------------

WATCH_INTERVAL = 1.0  # seconds between checks of a watched file (contract: at most 1 s)
INVALID_RETRY_AFTER = 5.0  # Retry-After for an invalid source: a user may fix it any moment
# A file modified this recently may change again within the file system's timestamp
# granularity without its signature changing (git's "racy clean" problem): re-read it.
_RACY_NS = 2_000_000_000
_MAX_SECRET_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class FileSignature:
    """What tells a changed file apart: an in-place rewrite or an atomic rename."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    mode: int


def file_signature(path: Path) -> FileSignature | None:
    """The file's signature, None when it cannot be stat'ed (missing, bad directory)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileSignature(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)


@dataclass(frozen=True, slots=True)
class SecretRead:
    """One read of a file holding a secret: the stripped text, or why there is none."""

    text: str | None = field(repr=False)
    reason: str  # "TokenLoaded" or TokenFileMissing / TokenFileEmpty / TokenFileUnreadable
    message: str  # names the file, never its contents
    signature: FileSignature | None


def check_secret_text(raw: bytes, *, spaces: bool = False) -> tuple[str | None, str]:
    """Pure: the stripped secret in `raw`, or (None, failure reason).

    A bearer token ends up in a header, so it must be one run of visible ASCII
    characters: anything else would let a stray newline inject headers. OAuth client
    secrets and refresh tokens are VSCHAR (RFC 6749 Appendix A), spaces allowed.
    """
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return None, "TokenFileInvalid"
    if not text:
        return None, "TokenFileEmpty"
    lowest = 0x20 if spaces else 0x21
    if not all(lowest <= ord(c) <= 0x7E for c in text):
        return None, "TokenFileInvalid"
    return text, "TokenLoaded"


_PROBLEMS = {
    "TokenFileEmpty": "is empty",
    "TokenFileInvalid": "must hold one value of visible ASCII characters on one line",
}


def read_secret_file(path: Path, what: str = "token file", *, spaces: bool = False
                     ) -> SecretRead:
    """Read and check a secret file; every failure becomes a reason and a message."""
    signature = file_signature(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_SECRET_BYTES + 1)
    except FileNotFoundError:
        return SecretRead(None, "TokenFileMissing", f"{what} {path} does not exist", None)
    except OSError as exc:
        problem = exc.strerror or type(exc).__name__
        return SecretRead(
            None, "TokenFileUnreadable", f"{what} {path} cannot be read: {problem}", signature
        )
    if len(raw) > _MAX_SECRET_BYTES:
        return SecretRead(None, "TokenFileInvalid", f"{what} {path} is too large", signature)
    text, reason = check_secret_text(raw, spaces=spaces)
    if text is None:
        return SecretRead(None, reason, f"{what} {path} {_PROBLEMS[reason]}", signature)
    return SecretRead(text, reason, f"{what} {path} loaded", signature)


class FileWatch:
    """Remembers a file's signature and says when it may have changed since."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: FileSignature | None = None
        self._seen = False

    def mark(self, signature: FileSignature | None) -> None:
        self._signature = signature
        self._seen = True

    def changed(self) -> bool:
        signature = file_signature(self.path)
        if not self._seen or signature != self._signature:
            return True
        # Same signature, but written so recently that a second write may hide in the
        # same timestamp tick: report a possible change; the caller compares contents.
        return signature is not None and time.time_ns() - signature.mtime_ns < _RACY_NS


def warn_if_shared(path: Path, signature: FileSignature | None, what: str) -> bool:
    """Log once-worthy warning when others may read a secret file; True when warned."""
    if signature is None or not signature.mode & (stat.S_IRGRP | stat.S_IROTH):
        return False
    get_logger().warning(
        "secret_file_readable_by_others",
        path=str(path),
        file=what,
        mode=oct(stat.S_IMODE(signature.mode)),
        hint=f"chmod 600 {path}",
    )
    return True


class _ReportOnChange:
    """Calls the reporter only when what it would say changes, never per request."""

    def __init__(self) -> None:
        self._report: CredentialReporter | None = None
        self._last: tuple[bool, str, str] | None = None

    def attach(self, report: CredentialReporter) -> None:
        self._report = report

    def __call__(self, available: bool, reason: str, message: str, permanent: bool) -> None:
        if self._last == (available, reason, message) or self._report is None:
            return
        self._last = (available, reason, message)
        self._report(available, reason, message, permanent)


# --- Bearer token sources ----------------------------------------------------------


class FileBearerSource:
    """`--bearer-token-file`: `Bearer <file contents, stripped>`, re-read when it changes.

    Invalid file contents never stop the proxy: the source reports itself unavailable
    (permanent: only a change of the file heals it) and heals on its own.
    """

    can_refresh = False

    def __init__(self, path: str | Path, *, poll_interval: float = WATCH_INTERVAL) -> None:
        self.path = Path(path)
        self.description = f"token file {self.path}"
        self._poll_interval = poll_interval
        self._watch = FileWatch(self.path)
        self._state = _ReportOnChange()
        self._credential: Credential | None = None
        self._version = 0
        self._problem: SecretRead | None = None
        self._warned = False
        self._task: asyncio.Task[None] | None = None

    @property
    def current_version(self) -> int | None:
        return self._credential.version if self._credential else None

    async def start(self, report: CredentialReporter) -> None:
        self._state.attach(report)
        self._reload()
        self._task = asyncio.create_task(self._watch_loop(), name="token-file-watch")

    async def close(self) -> None:
        await _cancel(self._task)
        self._task = None

    def ready(self) -> Credential | None:
        return self._credential

    async def get(self) -> Credential:
        if self._credential is not None:
            return self._credential
        problem = self._problem
        if problem is None:
            raise CredentialRetrying("CredentialNotStarted", f"{self.description} not loaded")
        raise CredentialInvalid(problem.reason, problem.message, INVALID_RETRY_AFTER)

    async def after_unauthorized(self, used: Credential) -> Credential | None:
        self.check()
        current = self._credential
        return current if current is not None and current.version > used.version else None

    def check(self) -> None:
        """Re-read the file when it may have changed (the watch loop and every 401)."""
        if self._watch.changed():
            self._reload()

    def _reload(self) -> None:
        result = read_secret_file(self.path, "token file")
        self._watch.mark(result.signature)
        if not self._warned:
            self._warned = warn_if_shared(self.path, result.signature, "token file")
        if result.text is None:
            self._credential = None
            self._problem = result
            self._state(False, result.reason, result.message, True)
            return
        authorization = f"Bearer {result.text}"
        if self._credential is None or self._credential.authorization != authorization:
            self._version += 1
            self._credential = Credential(authorization, self._version)
        self._problem = None
        self._state(True, "TokenLoaded", result.message, False)

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                self.check()
            except Exception:  # a bug here must not stop watching; never log contents
                get_logger().exception("token_file_check_failed", path=str(self.path))


class EnvBearerSource:
    """`--bearer-token-env`: `Bearer <value, stripped>`, read once at start."""

    can_refresh = False

    def __init__(self, variable: str, environ: Mapping[str, str] | None = None) -> None:
        self.variable = variable
        self.description = f"environment variable {variable}"
        self._environ = os.environ if environ is None else environ
        self._credential: Credential | None = None
        self._reason = "TokenEnvMissing"

    @property
    def current_version(self) -> int | None:
        return self._credential.version if self._credential else None

    async def start(self, report: CredentialReporter) -> None:
        text, reason = check_secret_text(self._environ.get(self.variable, "").encode())
        if text is None:
            # Config validation rejects unset/empty, so this is only reached when
            # embedding code changed the environment in between.
            self._reason = "TokenEnvMissing" if reason == "TokenFileEmpty" else "TokenEnvInvalid"
            report(False, self._reason, f"{self.description} is unset, empty or invalid", True)
            return
        self._credential = Credential(f"Bearer {text}", 1)
        report(True, "TokenLoaded", f"token read from {self.description}", False)

    async def close(self) -> None:
        return None

    def ready(self) -> Credential | None:
        return self._credential

    async def get(self) -> Credential:
        if self._credential is None:
            raise CredentialInvalid(
                self._reason, f"{self.description} is unset, empty or invalid",
                INVALID_RETRY_AFTER,
            )
        return self._credential

    async def after_unauthorized(self, used: Credential) -> Credential | None:
        return None


async def _cancel(task: asyncio.Task[Any] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def build_credential_source(
    config: ProxyConfig,
    *,
    session_factory: Callable[[], aiohttp.ClientSession] | None = None,
) -> CredentialSource | None:
    """The source the configuration asks for; None when no credential is configured."""
    kind = config.credential_kind
    if kind == "bearer_file":
        assert config.bearer_token_file is not None
        return FileBearerSource(config.bearer_token_file)
    if kind == "bearer_env":
        assert config.bearer_token_env is not None
        return EnvBearerSource(config.bearer_token_env)
    if kind == "oauth":
        from .oauth import OAuthSource  # oauth builds on this module's helpers

        return OAuthSource(config, session_factory=session_factory)
    return None
