"""The sign-in's requests and answers: PKCE, the authorization URL, posting to the
authorization server, and checking a token answer.

Pure where it can be; nothing here prints or logs a token, code or verifier, and every
failure is a `SignInError` naming the step and the server's `error` code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import hdrs
from yarl import URL

from ..errors import SignInError
from ..log import redact_url
from .token_endpoint import MAX_TOKEN_RESPONSE


def pkce_pair() -> tuple[str, str]:
    """A PKCE verifier (43 characters of 256 random bits) and its S256 challenge."""
    verifier = secrets.token_urlsafe(32)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorization_url(endpoint: str, *, client_id: str, redirect_uri: str, state: str,
                      challenge: str, resource: str, scopes: tuple[str, ...]) -> str:
    """The authorization request (RFC 6749 §4.1.1, RFC 7636, RFC 8707) as a URL."""
    query = {
        "response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
        "state": state, "code_challenge": challenge, "code_challenge_method": "S256",
        "resource": resource,
    }
    if scopes:
        query["scope"] = " ".join(scopes)
    return str(URL(endpoint).update_query(query))


@dataclass(frozen=True, slots=True)
class TokenAnswer:
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_in: float | None
    scope: tuple[str, ...] | None


def json_object(body: bytes) -> dict[str, Any] | None:
    """Pure: the JSON object in `body`, None when it holds anything else."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def refusal(doc: Mapping[str, Any] | None, status: int, fallback: str, step: str
            ) -> SignInError:
    """Pure: the error for a refused request: the server's `error` code (else
    `http_<status>`) and its printable `error_description` (else `fallback`)."""
    error = (doc or {}).get("error")
    return SignInError(step, describe(doc or {}, fallback),
                       error if isinstance(error, str) else f"http_{status}")


def check_token_answer(status: int, body: bytes, step: str) -> TokenAnswer:
    """Pure: the checked token answer (RFC 6749 §5.1), else `SignInError` with its code."""
    doc = json_object(body)
    if doc is None:
        raise SignInError(step, f"the token endpoint answered {status} without JSON",
                          f"http_{status}")
    if status != 200:
        raise refusal(doc, status, "the token endpoint refused", step)
    token_type = doc.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise SignInError(step, f"token_type is {token_type!r}, not Bearer",
                          "unsupported_token_type")
    token = doc.get("access_token")
    if not isinstance(token, str) or not token or not all(0x21 <= ord(c) <= 0x7E
                                                          for c in token):
        raise SignInError(step, "the answer holds no usable access_token", "invalid_response")
    expires_in = doc.get("expires_in")
    if expires_in is not None and (isinstance(expires_in, bool) or not isinstance(
            expires_in, int | float) or expires_in < 0):
        raise SignInError(step, "expires_in is not a number of seconds", "invalid_response")
    refresh = doc.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or not refresh.strip()):
        raise SignInError(step, "refresh_token is not a string", "invalid_response")
    scope = doc.get("scope")
    return TokenAnswer(token, refresh.strip() if isinstance(refresh, str) else None,
                       float(expires_in) if expires_in is not None else None,
                       tuple(scope.split()) if isinstance(scope, str) else None)


def describe(doc: Mapping[str, Any], fallback: str) -> str:
    """Pure: the server's `error_description`, printable and short, else `fallback`."""
    text = doc.get("error_description")
    if not isinstance(text, str) or not text.strip():
        return fallback
    return "".join(c if c.isprintable() else " " for c in text)[:200]


async def post_form(session: aiohttp.ClientSession, url: str, form: Mapping[str, str],
                    headers: Mapping[str, str], step: str) -> tuple[int, bytes]:
    """POST a form; the status and (bounded) body. Unreachable: `SignInError` "network"."""
    return await _post(session, url, step, data=dict(form), headers=dict(headers))


async def post_json(session: aiohttp.ClientSession, url: str, doc: Mapping[str, Any],
                    step: str) -> dict[str, Any]:
    """POST a JSON document; the JSON object of a 200 or 201 answer, else `SignInError`."""
    status, body = await _post(session, url, step, json=doc,
                               headers={hdrs.ACCEPT: "application/json"})
    answer = json_object(body)
    if answer is None:
        raise SignInError(step, f"{redact_url(url)} answered {status} without JSON",
                          f"http_{status}")
    if status not in (200, 201):
        raise refusal(answer, status, f"{redact_url(url)} answered {status}", step)
    return answer


async def _post(session: aiohttp.ClientSession, url: str, step: str, **kwargs: Any
                ) -> tuple[int, bytes]:
    try:
        async with session.post(url, allow_redirects=False, **kwargs) as response:
            return response.status, await response.content.read(MAX_TOKEN_RESPONSE)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise SignInError(step, f"{redact_url(url)} could not be reached "
                          f"({type(exc).__name__})", "network") from None
