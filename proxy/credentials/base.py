"""What every outgoing credential source shares: the credential, the source protocol,
the reporter it speaks to the auth monitor through, and small helpers.

Nothing here reads files or talks to a token endpoint; `files.py`, `bearer.py` and
`oauth.py` build on this module and never on each other's private parts. A source must
never log, raise or repr the secret itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# Retry-After for an invalid source: a user may fix it any moment.
INVALID_RETRY_AFTER = 5.0

# Told of every token an OAuth source takes up: (outcome, seconds it lives or None).
# `outcome` is how a token request ended ("success", "transient_error", "refused"), or
# TOKEN_LOADED for a token taken without one (a stored sign-in loaded or picked up): a
# listener then learns its expiry but counts no refresh.
RefreshListener = Callable[[str, float | None], None]
TOKEN_LOADED = "loaded"

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
    fix: str  # what a person does to repair it ("put a valid token in /run/token"), no secret
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




class ReportOnChange:
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



async def cancel_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait for it to end."""
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


