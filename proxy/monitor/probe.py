"""One health probe's answer, classified (pure): the outcome, a phrase for a person,
and whether the answer is handed on to the auth monitor.

`classify_probe` is table-tested; `health.HealthProber` sends the probes. A phrase never
holds the target's text beyond a plain `error` token, nor a credential.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import aiohttp
from aiohttp import hdrs

from ..credentials.challenge import bearer_error

# A protocol version or `error` code we repeat: a plain token, nothing the target wrote.
PLAIN_TOKEN = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ProbeOutcome(StrEnum):
    """What one probe found; the values are the `result` label of the probe metric."""

    REACHABLE = "reachable"  # answered below 500 (401 without a credential included)
    UNAUTHORIZED = "unauthorized"  # 401 to a probe that carried the current credential
    SERVER_ERROR = "server_error"  # answered 5xx
    TIMEOUT = "timeout"  # no answer within health_timeout
    UNREACHABLE = "unreachable"  # refused, reset, DNS or TLS failure

    @property
    def failed(self) -> bool:
        return self in _FAILED


_FAILED = frozenset({ProbeOutcome.SERVER_ERROR, ProbeOutcome.TIMEOUT, ProbeOutcome.UNREACHABLE})


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One classified probe. `detail` is a phrase for a person; it never holds a secret."""

    outcome: ProbeOutcome
    status: int | None
    detail: str
    notify: bool  # hand the answer to the forward observer (auth episodes, Authorized)

    @property
    def failed(self) -> bool:
        return self.outcome.failed


class ProbeRecorder(Protocol):
    """Counts probes by result (`proxy.metrics.Metrics` is one)."""

    def probe(self, result: ProbeResult) -> None: ...


def _error_code(headers: Mapping[str, str] | None) -> str | None:
    challenge = headers.get(hdrs.WWW_AUTHENTICATE) if headers else None
    if not challenge:
        return None
    code = bearer_error(challenge).error
    # Only a plain token goes into a message: the target's text is not ours to echo.
    return code if code and PLAIN_TOKEN.fullmatch(code) else None


def describe_error(error: BaseException) -> tuple[ProbeOutcome, str]:
    """A failed request as an outcome and a short phrase, without the exception's text."""
    # Order matters: aiohttp's TLS errors are also connection errors, and its
    # timeouts are also client errors.
    if isinstance(error, TimeoutError):
        return ProbeOutcome.TIMEOUT, "no answer within the health timeout"
    if isinstance(error, aiohttp.ClientSSLError | ssl.SSLError):
        return ProbeOutcome.UNREACHABLE, "the TLS handshake failed"
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return ProbeOutcome.UNREACHABLE, "the target's host name did not resolve"
    if isinstance(error, aiohttp.ClientConnectorError):
        return ProbeOutcome.UNREACHABLE, "the connection was refused"
    if isinstance(error, aiohttp.ServerDisconnectedError | ConnectionResetError):
        return ProbeOutcome.UNREACHABLE, "the connection was closed before an answer"
    if isinstance(error, aiohttp.ClientOSError | OSError):
        return ProbeOutcome.UNREACHABLE, "the connection failed"
    if isinstance(error, aiohttp.ClientResponseError):
        return ProbeOutcome.UNREACHABLE, "the answer was not valid HTTP"
    return ProbeOutcome.UNREACHABLE, f"the request failed ({type(error).__name__})"


def classify_probe(
    status: int | None,
    headers: Mapping[str, str] | None,
    error: BaseException | None,
    *,
    credentials_configured: bool,
) -> ProbeResult:
    """Classify one probe (pure).

    `credentials_configured` is True when the probe carried a credential from the
    configured source. A probe sent without one (no source, or the source had none at
    hand) cannot prove or disprove a credential, so its 401 only shows the target is up.
    """
    if error is not None or status is None:
        outcome, detail = describe_error(error or ConnectionError())
        return ProbeResult(outcome, None, detail, notify=False)
    if status >= 500:
        return ProbeResult(ProbeOutcome.SERVER_ERROR, status, f"the target answered {status}",
                           notify=True)
    code = _error_code(headers)
    suffix = f" ({code})" if code else ""
    if status == 401:
        if credentials_configured:
            return ProbeResult(ProbeOutcome.UNAUTHORIZED, status,
                               f"the target answered 401{suffix}", notify=True)
        # The client authenticates itself: a 401 to us proves the server is up, no more.
        return ProbeResult(ProbeOutcome.REACHABLE, status, f"the target answered 401{suffix}",
                           notify=False)
    return ProbeResult(ProbeOutcome.REACHABLE, status, f"the target answered {status}{suffix}",
                       notify=True)


def unreachable_message(failures: int, result: ProbeResult) -> str:
    probes = "health probe" if failures == 1 else f"{failures} consecutive health probes"
    return f"The last {probes} of the target failed: {result.detail}."
