"""Signing a workload in: client identity, the person's consent, the token answer.

After `discovery.discover` has found the authorization server, `sign_in` runs the rest of
the MCP authorization spec's flow and returns a `StoredSignIn` for `signin_store`:

- client identity (`registration.py`), first that applies: a client registered
  beforehand (`--client-id`); a Client ID Metadata Document URL where the server
  supports them; Dynamic Client Registration (RFC 7591) of a native public client,
  stored per issuer and reused while the server knows it (one it forgot, `invalid_client`,
  is dropped and registered anew, once per sign-in);
- the authorization code grant with PKCE S256 (RFC 7636, required), `state`, `resource`
  (RFC 8707) and a redirect to a loopback listener (RFC 8252 §7.3), or the device
  authorization grant (RFC 8628, `device.py`);
- the token answer checked (`login_http.py`): `token_type` Bearer, `access_token`,
  `expires_in`.

The loopback listener lives in `callback.py`. The person sees the authorization URL (or
the device code) on stderr; nothing here ever prints or logs a token, code, verifier or
client secret. Every failure is a `SignInError` naming the step and the server's `error`
code.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

import aiohttp
from yarl import URL

from ..errors import SignInError
from .callback import CallbackListener
from .device import device_grant
from .discovery import Discovery, ServerMetadata
from .login_http import (
    TokenAnswer,
    authorization_url,
    check_token_answer,
    describe,
    pkce_pair,
    post_form,
)
from .registration import DEVICE_GRANT, Client, register, still_registered
from .signin_store import (
    Registration,
    StoredSignIn,
    forget_registration,
    load_registration,
    save_registration,
)

__all__ = ["LoginOptions", "SignIn", "authorization_url", "check_token_answer",
           "pkce_pair"]


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
    store: str | None = None  # `--store redis://...`: the sign-in goes there, encrypted
    store_key_file: Path | None = None


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
                if (exc.code == "invalid_client" and client.registration is not None
                        and not client.new and attempt == 1):
                    # A stored registration the server forgot since it was checked
                    # (`_client`): register anew, once. A new one refused is an error.
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
            client = Client(reuse.client_id, reuse.client_secret, reuse)
            if await still_registered(self._session, self._server.token_endpoint, client):
                return client
            # Deleted or expired at the server: drop it and register anew, once.
            forget_registration(options.state_dir, self._server.issuer)
            self._say(f"{self._server.issuer} no longer knows the client registered "
                      "with it; registering a new one")
        return await self._register(redirect_uri)

    async def _register(self, redirect_uri: str | None) -> Client:
        # Every scope the resource offers, not just today's: a registration limited to
        # these would refuse a later step-up to more of them (invalid_scope).
        return await register(
            self._session, self._server, redirect_uri, device=self._options.device,
            scopes=(*self.scopes, *self._found.resource_metadata.scopes_supported))

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
            raise SignInError("authorization", describe(answer, "the authorization server "
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
        status, body = await post_form(self._session, self._server.token_endpoint, form,
                                       headers, "token request")
        return check_token_answer(status, body, "token request")

    # -- the device authorization grant ---------------------------------------------------

    async def _device(self) -> StoredSignIn:
        endpoint = self._server.device_authorization_endpoint
        if endpoint is None:
            raise SignInError("device authorization", f"{self._server.issuer} offers no "
                              "device_authorization_endpoint", "device_unsupported")
        reuse = None if self._options.client_id else self._stored_registration()
        client = await self._client(None, reuse)
        answer = await device_grant(
            self._session, self._server, endpoint, client, resource=self._found.resource,
            scopes=self.scopes, timeout=self._options.timeout, say=self._say)
        self._keep_registration(client)
        return self._stored(client, answer)



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
