"""The client identity a sign-in uses, and Dynamic Client Registration (RFC 7591).

`login` picks the first that applies: a client registered beforehand (`--client-id`), a
Client ID Metadata Document URL, a registration stored for the issuer while the server
still knows it (`still_registered`), else a new registration of a native public client
(`register`), stored once it has signed someone in. A client secret never reaches a log
or an error message.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import hdrs

from ..errors import SignInError
from .discovery import ServerMetadata
from .login_http import json_object, post_form, post_json
from .signin_store import Registration
from .token_endpoint import basic_client_auth

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CLIENT_NAME = "mcp-authproxy"


@dataclass(frozen=True, slots=True)
class Client:
    """The client identity a sign-in uses."""

    client_id: str
    secret: str | None = field(default=None, repr=False)
    registration: Registration | None = None  # set when it came from DCR
    new: bool = False  # registered by this sign-in (stored once it succeeds)

    def auth(self, form: dict[str, str]) -> dict[str, str]:
        """Client authentication for a token-endpoint request: headers (form updated)."""
        headers: dict[str, str] = {hdrs.ACCEPT: "application/json"}
        if self.secret is not None:
            headers[hdrs.AUTHORIZATION] = basic_client_auth(self.client_id, self.secret)
        else:
            form["client_id"] = self.client_id
        return headers


async def register(session: aiohttp.ClientSession, server: ServerMetadata,
                   redirect_uri: str | None, *, device: bool, scopes: tuple[str, ...]
                   ) -> Client:
    """RFC 7591: a native public client with the loopback redirect URI (none for the
    device grant), allowed `scopes`; the new, not yet stored, `Client`."""
    step = "client registration"
    endpoint = server.registration_endpoint
    if endpoint is None:
        raise SignInError(step, f"{server.issuer} offers no registration_endpoint "
                          "and no Client ID Metadata Documents; give --client-id",
                          "registration_unsupported")
    grants = ["refresh_token"]
    metadata: dict[str, Any] = {
        "client_name": CLIENT_NAME, "application_type": "native",
        "token_endpoint_auth_method": "none",
    }
    if redirect_uri is not None:
        grants.insert(0, "authorization_code")
        metadata["redirect_uris"] = [redirect_uri]
        metadata["response_types"] = ["code"]
    else:
        metadata["response_types"] = []
    if device or DEVICE_GRANT in server.grant_types:
        grants.append(DEVICE_GRANT)
    metadata["grant_types"] = grants
    wanted = tuple(dict.fromkeys(scopes))
    if wanted:
        metadata["scope"] = " ".join(wanted)
    doc = await post_json(session, endpoint, metadata, step)
    client_id = doc.get("client_id")
    if not isinstance(client_id, str) or not client_id:
        raise SignInError(step, "the registration answer holds no client_id",
                          "invalid_response")
    secret = doc.get("client_secret")
    uris = doc.get("redirect_uris", metadata.get("redirect_uris", []))
    registration = Registration(
        server.issuer, client_id,
        tuple(u for u in uris if isinstance(u, str)) if isinstance(uris, list) else (),
        tuple(grants), secret if isinstance(secret, str) else None)
    return Client(client_id, registration.client_secret, registration, new=True)


async def still_registered(session: aiohttp.ClientSession, token_endpoint: str,
                           client: Client) -> bool:
    """Whether the server still knows a stored registration (it may have deleted or
    expired it). A refresh with a made-up refresh token authenticates the client before
    anything else: a client the server forgot gets `invalid_client` (RFC 6749 §5.2), a
    known one `invalid_grant`. Only `invalid_client` says it is gone, so that a server
    answering otherwise keeps its registration; asked before the person is sent to a
    browser, where an unknown client gets an error page and no redirect back."""
    form = {"grant_type": "refresh_token", "refresh_token": secrets.token_urlsafe(32)}
    headers = client.auth(form)
    status, body = await post_form(session, token_endpoint, form, headers,
                                   "client registration check")
    doc = json_object(body)
    return not (status in (400, 401) and doc is not None
                and doc.get("error") == "invalid_client")
