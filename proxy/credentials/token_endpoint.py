"""The token endpoint's wire protocol, pure: requests, answers and their verdicts.

`classify_token_response` turns every answer of the token endpoint, or the
error that stood for one, into "transient" (retry with backoff) or "permanent" (only a
change of the source's files heals it), following RFC 6749 §5.2:

| answer | verdict |
|---|---|
| 2xx JSON with `access_token` | success |
| 2xx without a usable `access_token` (a captive portal, a misrouted page) | transient |
| 3xx (the configured URL is wrong; redirects are not followed) | permanent |
| 4xx JSON with an RFC 6749 `error` code | permanent (but see `TRANSIENT_ERROR_CODES`) |
| 4xx whose body is no RFC 6749 error object (a WAF or CDN page) | transient |
| 429, 5xx | transient, honouring `Retry-After` |
| network errors, timeouts | transient |
| TLS certificate errors | permanent |

A 2xx without `access_token` is transient on purpose: no authorization server answers
that way to a grant it refuses, so it is something in between that may go away; if it
does not, `auth_give_up_after` turns it permanent.

This module must never log, report or raise the access token, refresh token or client
secret: messages carry error codes and descriptions, scrubbed of the known secrets.
"""

from __future__ import annotations

import base64
import json
import random
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aiohttp
from aiohttp import hdrs

from ..log import redact_text, redact_url
from ..safe_fs import write_atomically

RETRY_AFTER_MAX = 3600.0  # a server's Retry-After is honoured up to this
REFRESH_SKEW_MAX = 30.0  # refresh this long before expiry at most ...
REFRESH_SKEW_RATIO = 0.1  # ... or this share of the lifetime, whichever is shorter
MAX_TOKEN_RESPONSE = 256 * 1024

TRANSIENT_ERROR_CODES = frozenset({"temporarily_unavailable", "server_error", "slow_down"})


@dataclass(frozen=True, slots=True)
class TokenFailure:
    """Why a token request failed, and whether retrying can help."""

    permanent: bool
    code: str  # RFC 6749 error code, or http_<status>, network, timeout, tls, ...
    description: str | None = None  # for people; never a secret
    status: int | None = None
    retry_after: float | None = None  # the server's Retry-After, seconds

    def message(self) -> str:
        detail = f" ({self.description})" if self.description else ""
        if self.permanent and self.status is not None and 400 <= self.status < 500:
            return f"token endpoint refused the grant: {self.code}{detail}"
        if self.code == "tls":
            return f"token endpoint's TLS certificate was not accepted{detail}"
        if self.status is not None:
            return f"token endpoint answered {self.status}: {self.code}{detail}"
        return f"token request failed: {self.code}{detail}"


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """A successful token answer (RFC 6749 §5.1)."""

    access_token: str = field(repr=False)
    expires_in: float | None
    refresh_token: str | None = field(repr=False)
    # Taken from the shared store (another replica's refresh, a sign-in put there), not
    # granted to this process: reported as a token loaded, never counted as a refresh.
    adopted: bool = False


# --- Pure helpers ----------------------------------------------------------------------


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a `Retry-After` value (delta-seconds or HTTP-date), None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_MAX)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(delta, 0.0), RETRY_AFTER_MAX)


def _clean(text: Any, limit: int = 200) -> str | None:
    """A server-supplied string made safe for a one-line message."""
    if not isinstance(text, str):
        return None
    printable = "".join(c if c.isprintable() else " " for c in text).strip()
    return redact_text(printable[:limit]) or None


def _json_object(body: bytes | None) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _is_header_safe(token: str) -> bool:
    return bool(token) and all(0x21 <= ord(c) <= 0x7E for c in token)


def parse_token_response(body: bytes | None) -> TokenResponse | None:
    """The token answer in `body`, None when it holds no usable bearer access token."""
    obj = _json_object(body)
    if obj is None:
        return None
    token = obj.get("access_token")
    if not isinstance(token, str) or not _is_header_safe(token):
        return None
    token_type = obj.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        return None
    expires_in = obj.get("expires_in")
    if isinstance(expires_in, str) and expires_in.strip().isdigit():
        expires_in = int(expires_in)  # some servers send it as a string
    lifetime = float(expires_in) if isinstance(expires_in, int | float) and not isinstance(
        expires_in, bool) and expires_in >= 0 else None
    refresh = obj.get("refresh_token")
    if isinstance(refresh, str):  # VSCHAR (RFC 6749 Appendix A): spaces allowed
        refresh = refresh.strip()
        if not refresh or not all(0x20 <= ord(c) <= 0x7E for c in refresh):
            refresh = None
    else:
        refresh = None
    return TokenResponse(token, lifetime, refresh)


def _is_cert_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, aiohttp.ClientConnectorCertificateError | (
                ssl.SSLCertVerificationError)):
            return True
        current = current.__cause__ or current.__context__
    return False


def classify_token_response(
    status: int | None,
    headers: Mapping[str, str] | None,
    body: bytes | None,
    exc: BaseException | None,
) -> TokenFailure | None:
    """Pure: None for a usable token answer, else the failure and its kind (table above)."""
    if exc is not None:
        if _is_cert_error(exc):
            return TokenFailure(True, "tls", _clean(str(exc)))
        if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
            return TokenFailure(False, "timeout", "no answer in time")
        if isinstance(exc, aiohttp.ClientError | OSError):
            return TokenFailure(False, "network", _clean(str(exc)) or type(exc).__name__)
        return TokenFailure(False, "error", type(exc).__name__)
    if status is None:
        return TokenFailure(False, "network", "no answer")
    retry_after = parse_retry_after((headers or {}).get(hdrs.RETRY_AFTER))
    if 200 <= status < 300:
        if parse_token_response(body) is not None:
            return None
        return TokenFailure(False, "no_access_token",
                            "the answer held no usable bearer access_token", status)
    if 300 <= status < 400:
        location = _clean(redact_url((headers or {}).get(hdrs.LOCATION, "")))
        where = f"to {location}; configure the final URL" if location else None
        return TokenFailure(True, "redirect", where, status)
    if status == 429 or status >= 500:
        code = "rate_limited" if status == 429 else f"http_{status}"
        return TokenFailure(False, code, None, status, retry_after)
    obj = _json_object(body)
    error = obj.get("error") if obj is not None else None
    if isinstance(error, str) and error and _is_header_safe(error):
        description = _clean(obj.get("error_description")) if obj is not None else None
        permanent = error not in TRANSIENT_ERROR_CODES
        return TokenFailure(permanent, error, description, status, retry_after)
    # A 4xx page that is no RFC 6749 error object comes from something in between (a
    # WAF, a CDN, a captive portal) rather than the authorization server: retry.
    return TokenFailure(False, f"http_{status}", "not an OAuth error response", status,
                        retry_after)


def backoff_delay(failures: int, base: float, cap: float,
                  rand: Callable[[], float] = random.random) -> float:
    """Capped exponential backoff with full jitter (AWS architecture blog), in seconds."""
    exponent = min(max(failures - 1, 0), 62)
    return rand() * min(cap, base * (2.0 ** exponent))


def refresh_skew(lifetime: float) -> float:
    """How long before expiry to refresh: 10 % of the lifetime, at most 30 s."""
    return min(REFRESH_SKEW_MAX, lifetime * REFRESH_SKEW_RATIO)


def basic_client_auth(client_id: str, secret: str) -> str:
    """`client_secret_basic` (RFC 6749 §2.3.1): form-encode id and secret, then base64."""
    pair = f"{quote_plus(client_id, safe='')}:{quote_plus(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def token_request(
    *,
    client_id: str,
    secret: str | None,
    refresh_token: str | None,
    resource: str,
    scopes: tuple[str, ...],
) -> tuple[dict[str, str], dict[str, str]]:
    """Pure: the headers and form fields of one token request."""
    headers: dict[str, str] = {hdrs.ACCEPT: "application/json"}
    form: dict[str, str] = {}
    if refresh_token is not None:
        form["grant_type"] = "refresh_token"
        form["refresh_token"] = refresh_token
    else:
        form["grant_type"] = "client_credentials"
    form["resource"] = resource
    if scopes:
        form["scope"] = " ".join(scopes)
    if secret is not None:
        headers[hdrs.AUTHORIZATION] = basic_client_auth(client_id, secret)
    else:
        form["client_id"] = client_id
    return headers, form


def write_secret_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` + newline, atomically and with mode 0600."""
    write_atomically(path, text.encode("ascii") + b"\n")
