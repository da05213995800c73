"""Outgoing credentials: one interface for every source the proxy can inject from.

A source yields a `Credential` (the `Authorization` value to send), tells the auth
monitor through its `CredentialReporter` whether it can (the `CredentialAvailable`
condition), and re-checks itself when the target answers 401. It must never log,
raise or repr the secret itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


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
