"""Signing a workload in: client identity, the person's consent, the token answer.

After `discovery.discover` has found the authorization server, `sign_in` runs the rest of
the MCP authorization spec's flow and returns a `StoredSignIn` for `signin_store`:

- client identity, first that applies: a client registered beforehand (`--client-id`);
  a Client ID Metadata Document URL where the server supports them; Dynamic Client
  Registration (RFC 7591) of a native public client, stored per issuer and reused;
- the authorization code grant with PKCE S256 (RFC 7636, required), `state`, `resource`
  (RFC 8707) and a redirect to a loopback listener (RFC 8252 §7.3), or the device
  authorization grant (RFC 8628);
- the token answer checked: `token_type` Bearer, `access_token`, `expires_in`.

The loopback listener lives in `callback.py`. The person sees the authorization URL (or
the device code) on stderr; nothing here ever prints or logs a token, code, verifier or
client secret. Every failure is a `SignInError` naming the step and the server's `error`
code.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import threading
import webbrowser
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from aiohttp import hdrs
from yarl import URL

from ..errors import SignInError
from ..log import redact_url
from .callback import CallbackListener
from .discovery import Discovery, ServerMetadata
from .signin_store import (
    Registration,
    StoredSignIn,
    forget_registration,
    load_registration,
    save_registration,
)
from .token_endpoint import MAX_TOKEN_RESPONSE, basic_client_auth

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CLIENT_NAME = "mcp-authproxy"


@dataclass(frozen=True, slots=True)
class LoginOptions:
    """What `mcp-authproxy login` was asked to do (flags one to one)."""

    name: str
    target_url: str
    state_dir: Path
    scopes: tuple[str, ...] = ()
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    client_metadata_url: str | None = None
    callback_port: int | None = None
    no_browser: bool = False
    device: bool = False
    timeout: float = 300.0


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


# --- pure helpers -----------------------------------------------------------------------


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


def check_token_answer(status: int, body: bytes, step: str) -> TokenAnswer:
    """Pure: the checked token answer (RFC 6749 §5.1), else `SignInError` with its code."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict):
        raise SignInError(step, f"the token endpoint answered {status} without JSON",
                          f"http_{status}")
    if status != 200:
        error = doc.get("error") if isinstance(doc.get("error"), str) else f"http_{status}"
        raise SignInError(step, _describe(doc, "the token endpoint refused"), error)
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


def _describe(doc: Mapping[str, Any], fallback: str) -> str:
    text = doc.get("error_description")
    if not isinstance(text, str) or not text.strip():
        return fallback
    return "".join(c if c.isprintable() else " " for c in text)[:200]


def _quietly(open_browser: Callable[[str], bool], url: str) -> None:
    with contextlib.suppress(Exception):  # no browser at all: the URL is printed
        open_browser(url)



# --- the flow ---------------------------------------------------------------------------


class SignIn:
    """One `login`: client identity, consent, token answer. Use `run()` once."""

    def __init__(self, session: aiohttp.ClientSession, found: Discovery,
                 options: LoginOptions, *, stderr: TextIO,
                 open_browser: Callable[[str], bool] = webbrowser.open) -> None:
        self._session = session
        self._found = found
        self._server: ServerMetadata = found.server
        self._options = options
        self._stderr = stderr
        self._open_browser = open_browser

    @property
    def scopes(self) -> tuple[str, ...]:
        return (self._options.scopes or self._found.challenge_scope
                or self._found.resource_metadata.scopes_supported)

    async def run(self) -> StoredSignIn:
        if self._options.device:
            return await self._device()
        if "S256" not in self._server.code_challenge_methods:
            raise SignInError("authorization server metadata",
                              f"{self._server.issuer} does not offer PKCE S256 "
                              "(code_challenge_methods_supported)", "pkce_unsupported")
        if self._server.authorization_endpoint is None:
            raise SignInError("authorization server metadata",
                              f"{self._server.issuer} has no authorization_endpoint")
        for attempt in (1, 2):
            client, listener, state = await self._prepare()
            try:
                granted = await self._authorize(client, listener, state)
                answer = await self._exchange_code(client, granted, listener.redirect_uri)
            except SignInError as exc:
                if exc.code == "invalid_client" and client.registration and attempt == 1:
                    # A stored registration the server forgot: register anew, once.
                    forget_registration(self._options.state_dir, self._server.issuer)
                    continue
                raise
            finally:
                await listener.close()
            self._keep_registration(client)
            return self._stored(client, answer)
        raise AssertionError("unreachable")

    # -- client identity and the listener ------------------------------------------------

    async def _prepare(self) -> tuple[Client, CallbackListener, str]:
        state = secrets.token_urlsafe(32)
        listener = CallbackListener(state)
        options = self._options
        reuse: Registration | None = None
        if options.client_id is None and not self._use_metadata_document():
            reuse = self._stored_registration()
        port = options.callback_port
        if port is None and reuse is not None and reuse.redirect_uris:
            port = URL(reuse.redirect_uris[0]).port
        try:
            await listener.start(port or 0)
        except OSError as exc:
            if options.callback_port is not None:
                raise SignInError("callback listener", f"cannot listen on 127.0.0.1:"
                                  f"{options.callback_port} ({exc.strerror})") from None
            await listener.start(0)  # the registered port is taken: register anew
            reuse = None
        if reuse is not None and listener.redirect_uri not in reuse.redirect_uris:
            reuse = None
        try:
            client = await self._client(listener.redirect_uri, reuse)
        except BaseException:
            await listener.close()
            raise
        return client, listener, state

    def _use_metadata_document(self) -> bool:
        return (self._options.client_metadata_url is not None
                and self._server.client_id_metadata_document_supported)

    def _stored_registration(self) -> Registration | None:
        found = load_registration(self._options.state_dir, self._server.issuer)
        if found is None:
            return None
        if self._options.device and DEVICE_GRANT not in found.grant_types:
            return None
        return found

    async def _client(self, redirect_uri: str | None, reuse: Registration | None) -> Client:
        options = self._options
        if options.client_id is not None:
            return Client(options.client_id, options.client_secret)
        if self._use_metadata_document():
            assert options.client_metadata_url is not None
            return Client(options.client_metadata_url)
        if reuse is not None:
            return Client(reuse.client_id, reuse.client_secret, reuse)
        return await self._register(redirect_uri)

    async def _register(self, redirect_uri: str | None) -> Client:
        """RFC 7591: a native public client with the loopback redirect URI."""
        step = "client registration"
        endpoint = self._server.registration_endpoint
        if endpoint is None:
            raise SignInError(step, f"{self._server.issuer} offers no registration_endpoint "
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
        if self._options.device or DEVICE_GRANT in self._server.grant_types:
            grants.append(DEVICE_GRANT)
        metadata["grant_types"] = grants
        # Every scope the resource offers, not just today's: a registration limited to
        # these would refuse a later step-up to more of them (invalid_scope).
        wanted = tuple(dict.fromkeys(
            (*self.scopes, *self._found.resource_metadata.scopes_supported)))
        if wanted:
            metadata["scope"] = " ".join(wanted)
        doc = await self._post_json(endpoint, metadata, step)
        client_id = doc.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            raise SignInError(step, "the registration answer holds no client_id",
                              "invalid_response")
        secret = doc.get("client_secret")
        uris = doc.get("redirect_uris", metadata.get("redirect_uris", []))
        registration = Registration(
            self._server.issuer, client_id,
            tuple(u for u in uris if isinstance(u, str)) if isinstance(uris, list) else (),
            tuple(grants), secret if isinstance(secret, str) else None)
        return Client(client_id, registration.client_secret, registration, new=True)

    def _keep_registration(self, client: Client) -> None:
        """Store a new registration once it has signed someone in: a sign-in that fails
        writes nothing."""
        if client.registration is not None and client.new:
            save_registration(self._options.state_dir, client.registration)

    # -- the authorization code grant ---------------------------------------------------

    async def _authorize(self, client: Client, listener: CallbackListener, state: str
                         ) -> tuple[str, str]:
        """The person's consent: returns (code, verifier)."""
        verifier, challenge = pkce_pair()
        assert self._server.authorization_endpoint is not None
        url = authorization_url(
            self._server.authorization_endpoint, client_id=client.client_id,
            redirect_uri=listener.redirect_uri, state=state, challenge=challenge,
            resource=self._found.resource, scopes=self.scopes)
        if self._options.no_browser:
            self._say(f"To sign in to {self._server.issuer}, open this URL in a browser:\n{url}")
        else:
            self._say(f"Opening a browser to sign in to {self._server.issuer}; if none opens, "
                      f"open this URL:\n{url}")
            # A daemon thread: some browsers block until they exit, and neither the wait
            # for the answer nor the process's exit may depend on that.
            threading.Thread(target=_quietly, args=(self._open_browser, url),
                             name="login-browser", daemon=True).start()
        answer = await listener.wait(self._options.timeout)
        if "error" in answer:
            raise SignInError("authorization", _describe(answer, "the authorization server "
                              "did not grant access"), answer.get("error") or "error")
        iss = answer.get("iss")
        if iss is not None and iss != self._server.issuer:
            raise SignInError("authorization", f"the answer came from issuer {iss!r}, not "
                              f"{self._server.issuer}", "issuer_mismatch")
        if iss is None and self._server.iss_parameter_supported:
            raise SignInError("authorization", "the answer carries no iss although the "
                              "server promised it (RFC 9207)", "issuer_mismatch")
        code = answer.get("code")
        if not code:
            raise SignInError("authorization", "the answer carries no code", "invalid_response")
        return code, verifier

    async def _exchange_code(self, client: Client, code_verifier: tuple[str, str],
                             redirect_uri: str) -> TokenAnswer:
        code, verifier = code_verifier
        form = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": redirect_uri, "code_verifier": verifier,
                "resource": self._found.resource}
        headers = client.auth(form)
        status, body = await self._post_form(self._server.token_endpoint, form, headers,
                                             "token request")
        return check_token_answer(status, body, "token request")

    # -- the device authorization grant ---------------------------------------------------

    async def _device(self) -> StoredSignIn:
        step = "device authorization"
        endpoint = self._server.device_authorization_endpoint
        if endpoint is None:
            raise SignInError(step, f"{self._server.issuer} offers no "
                              "device_authorization_endpoint", "device_unsupported")
        reuse = None if self._options.client_id else self._stored_registration()
        client = await self._client(None, reuse)
        form = {"resource": self._found.resource}
        if self.scopes:
            form["scope"] = " ".join(self.scopes)
        headers = client.auth(form)
        status, body = await self._post_form(endpoint, form, headers, step)
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict) or status != 200:
            error = doc.get("error") if isinstance(doc, dict) else None
            raise SignInError(step, _describe(doc or {}, f"the server answered {status}"),
                              error if isinstance(error, str) else f"http_{status}")
        device_code, user_code = doc.get("device_code"), doc.get("user_code")
        uri = doc.get("verification_uri")
        if not all(isinstance(v, str) and v for v in (device_code, user_code, uri)):
            raise SignInError(step, "the answer lacks device_code, user_code or "
                              "verification_uri", "invalid_response")
        assert isinstance(device_code, str)
        complete = doc.get("verification_uri_complete")
        self._say(f"To sign in to {self._server.issuer}, visit {uri} and enter the code "
                  f"{user_code}" + (f"\n(or open {complete})" if isinstance(complete, str)
                                    else ""))
        interval = doc.get("interval")
        wait = float(interval) if isinstance(interval, int | float) and interval > 0 else 5.0
        expires = doc.get("expires_in")
        limit = min(self._options.timeout, float(expires) if isinstance(
            expires, int | float) and expires > 0 else self._options.timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            if loop.time() + wait > deadline:
                raise SignInError("device authorization",
                                  f"not completed within {limit:g} s", "expired_token")
            await asyncio.sleep(wait)
            poll = {"grant_type": DEVICE_GRANT, "device_code": device_code,
                    "resource": self._found.resource}
            headers = client.auth(poll)
            status, body = await self._post_form(self._server.token_endpoint, poll,
                                                 headers, "token request")
            try:
                answer = check_token_answer(status, body, "token request")
            except SignInError as exc:
                if exc.code == "authorization_pending":
                    continue
                if exc.code == "slow_down":
                    wait += 5.0  # RFC 8628 §3.5
                    continue
                raise
            self._keep_registration(client)
            return self._stored(client, answer)

    # -- HTTP and the result ---------------------------------------------------------------

    async def _post_form(self, url: str, form: dict[str, str], headers: dict[str, str],
                         step: str) -> tuple[int, bytes]:
        try:
            async with self._session.post(url, data=form, headers=headers,
                                          allow_redirects=False) as response:
                return response.status, await response.content.read(MAX_TOKEN_RESPONSE)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SignInError(step, f"{redact_url(url)} could not be reached "
                              f"({type(exc).__name__})", "network") from None

    async def _post_json(self, url: str, doc: Mapping[str, Any], step: str
                         ) -> dict[str, Any]:
        try:
            async with self._session.post(url, json=doc, headers={
                    hdrs.ACCEPT: "application/json"}, allow_redirects=False) as response:
                status, body = response.status, await response.content.read(
                    MAX_TOKEN_RESPONSE)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SignInError(step, f"{redact_url(url)} could not be reached "
                              f"({type(exc).__name__})", "network") from None
        try:
            answer = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            answer = None
        if not isinstance(answer, dict):
            raise SignInError(step, f"{redact_url(url)} answered {status} without JSON",
                              f"http_{status}")
        if status not in (200, 201):
            error = answer.get("error")
            raise SignInError(step, _describe(answer, f"{redact_url(url)} answered {status}"),
                              error if isinstance(error, str) else f"http_{status}")
        return answer

    def _stored(self, client: Client, answer: TokenAnswer) -> StoredSignIn:
        now = datetime.now(UTC).replace(microsecond=0)
        return StoredSignIn(
            target_url=self._found.target_url, resource=self._found.resource,
            issuer=self._server.issuer, token_endpoint=self._server.token_endpoint,
            client_id=client.client_id, client_secret=client.secret,
            access_token=answer.access_token, refresh_token=answer.refresh_token,
            expires_at=(now + timedelta(seconds=answer.expires_in)
                        if answer.expires_in is not None else None),
            scope=answer.scope if answer.scope is not None else self.scopes,
            signed_in_at=now,
        )

    def _say(self, text: str) -> None:
        print(text, file=self._stderr, flush=True)
