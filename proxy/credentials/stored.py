"""`run --oauth`: the sign-in `mcp-authproxy login` stored, as the outgoing credential.

`StoredSignInSource` is an `OAuthSource` whose client, token endpoint and refresh token
come from `<state-dir>/credentials/<name>.json` instead of flags, so every OAuth rule
applies unchanged: `resource`, single flight, classification, backoff, 503 while no
token is at hand. What differs:

- no sign-in stored, or the refresh token refused (`invalid_grant`, or a client the
  server forgot, `invalid_client`): the source is invalid with reason `LoginRequired`
  and a message naming `mcp-authproxy login NAME`;
- the stored access token is used while it is fresh (no refresh at start);
- a refresh writes the new tokens back, but only onto the sign-in it started from
  (`signin_store.write_back`): a refresh never overwrites a newer sign-in;
- the file is watched: a new sign-in written by `login` heals the source at once,
  in the same process, and its token replaces whatever a refresh in flight brings.

With a shared store (`--store redis://`), the sign-in lives there instead (`login
--store`), encrypted (`token_store.RedisTokenStore`) and authoritative: every refresh
runs under the store's refresh lock on the sign-in read from the store, adopts a fresh
token another replica got, and saves a rotated refresh token in the store before the
new access token is used. Each replica reads the store every second: a new `login
--store` heals every replica without a restart.

Never logs or reports a token; messages name the file and the server's error code.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..config import ProxyConfig
from ..errors import StateError, StoreKeyMismatch
from ..log import get_logger, redact_url
from .base import TOKEN_LOADED, Credential, CredentialReporter
from .files import FileWatch, file_signature
from .oauth import OAuthSource
from .signin_store import (
    CredentialsFileRefused,
    StoredSignIn,
    load_signin,
    signin_path,
    write_back,
)
from .token_endpoint import TokenFailure, TokenResponse, refresh_skew
from .token_store import RedisTokenStore

LOGIN_REQUIRED = "LoginRequired"
# Refusals that only a new sign-in can heal.
_SIGN_IN_AGAIN = frozenset({"invalid_grant", "invalid_client", "unauthorized_client"})


def login_command(name: str) -> str:
    return f"mcp-authproxy login {name}"


class StoredSignInSource(OAuthSource):
    """`--oauth`: the stored sign-in, refreshed with its refresh token and client."""

    def __init__(self, config: ProxyConfig, *, signin_store: RedisTokenStore | None = None,
                 **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._name = config.workload
        self._path: Path = signin_path(config.state_path, self._name)
        self._store = signin_store
        self._watches = [FileWatch(self._path)] if signin_store is None else []
        self._signin: StoredSignIn | None = None
        self._answer_for: StoredSignIn | None = None
        self._login = login_command(self._name)
        if signin_store is None:
            self.description = f"the sign-in stored in {self._path}"
        else:
            self.description = f"the sign-in stored in {signin_store.display}"
            self._login += f" --store {signin_store.display} --store-key-file KEY"
        self.fix = f"sign in again: {self._login}"

    async def start(self, report: CredentialReporter) -> None:
        await super().start(report)
        if self._store is not None:
            self._tasks.append(asyncio.create_task(self._watch_store(),
                                                   name="signin-store-watch"))

    async def _before_drive(self) -> None:
        # The stored sign-in is read before the driver first looks: otherwise the driver,
        # seeing no token yet, could start a refresh that then finds the same sign-in
        # adopted meanwhile and refreshes a token that was still fresh.
        if self._store is not None:
            await self._check_store(initial=True)

    async def get(self) -> Credential:
        if self._permanent is not None:
            # Waiting for a sign-in: look at once (a stat) rather than at the next watch
            # tick, so the first request after `login` already carries the new token.
            self._load_files(initial=False)
        return await super().get()

    # -- what the OAuth machinery asks of its inputs --------------------------------------

    def _grant_refresh_token(self) -> str | None:
        return self._refresh_token

    async def _request_token(self) -> TokenResponse | TokenFailure:
        if self._store is not None:
            return await self._store_request(self._store)
        started_with = self._signin
        if started_with is None or started_with.refresh_token is None:
            return TokenFailure(True, "invalid_grant", "no refresh token is stored")
        outcome = await super()._request_token()
        self._answer_for = started_with
        return outcome

    async def _succeeded(self, answer: TokenResponse, now: float) -> None:
        if self._answer_for is not self._signin:
            # A newer sign-in arrived while this refresh was in flight: it wins.
            self._answer_for = None
            return
        await super()._succeeded(answer, now)

    async def _keep(self, answer: TokenResponse) -> None:
        if self._store is not None:
            return  # saved in the store, under its lock, before this answer is used
        signin = self._signin
        assert signin is not None
        expires_at = (datetime.fromtimestamp(time.time() + answer.expires_in, UTC)
                      if answer.expires_in is not None else None)
        updated = signin.refreshed(answer.access_token, answer.refresh_token, expires_at, None)
        self._signin = updated
        self._refresh_token = updated.refresh_token  # in memory first: the old one is dead
        try:
            written = await asyncio.to_thread(write_back, self._config.state_path,
                                              self._name, updated)
        except (OSError, CredentialsFileRefused) as exc:
            get_logger().warning("signin_not_saved", path=str(self._path),
                                 error=getattr(exc, "strerror", None) or str(exc))
            return
        if written:
            self._watches[0].mark(file_signature(self._path))
        # Not written: a newer sign-in is there; the file watch adopts it.

    def _give_up(self, reason: str, message: str) -> None:
        failure = self._last_failure
        if reason == "TokenRefreshFailed" and failure is not None and (
                failure.code in _SIGN_IN_AGAIN):
            reason = LOGIN_REQUIRED
            message = f"{message}; sign in again: {self._login}"
        super()._give_up(reason, message)

    # -- the credentials file ---------------------------------------------------------------

    def _load_files(self, *, initial: bool) -> bool:
        if self._store is not None:
            return False  # the store is watched instead (`_watch_store`)
        watch = self._watches[0]
        if not initial and not watch.changed():
            return False
        watch.mark(file_signature(self._path))
        try:
            signin = load_signin(self._config.state_path, self._name)
        except CredentialsFileRefused as exc:
            self._last_failure = None
            super()._give_up("CredentialsFileRefused", str(exc))
            return False
        if signin is None:
            if initial or self._signin is None:
                self._last_failure = None
                super()._give_up(LOGIN_REQUIRED, f"no sign-in is stored for workload "
                                 f"{self._name}; run: {login_command(self._name)}")
            return False
        current = self._signin
        if current is not None and current.signin_id == signin.signin_id:
            return False  # our own write-back, or nothing that matters
        self._adopt(signin)
        return True

    def _adopt(self, signin: StoredSignIn) -> None:
        """Take a (new) sign-in: its client, its refresh token, its token while fresh."""
        self._take_client(signin)
        self._reset_failures()
        self._last_failure = None
        self._rejected = None
        get_logger().info("signin_loaded", workload=self._name,
                          issuer=redact_url(signin.issuer), scope=" ".join(signin.scope))
        now = self._clock()
        remaining = (None if signin.expires_at is None
                     else (signin.expires_at - datetime.now(UTC)).total_seconds())
        if remaining is not None and remaining <= 1.0:
            # Expired already: refresh at once (the driver sees no credential).
            self._credential = None
            self._expires_at = self._refresh_at = None
            self._tell(TOKEN_LOADED, None)  # no token at hand until the refresh
            self._wake.set()
            return
        self._version += 1
        self._credential = Credential(f"Bearer {signin.access_token}", self._version)
        if remaining is None:
            self._expires_at = self._refresh_at = None
        else:
            lifetime = (signin.expires_at - signin.signed_in_at).total_seconds() if (
                signin.expires_at is not None) else remaining
            ahead = remaining - refresh_skew(max(lifetime, remaining))
            self._expires_at = now + remaining
            self._refresh_at = now + max(ahead, self._min_refresh_delay)
        self._last_ok = True
        self._tell(TOKEN_LOADED, remaining)  # its expiry is known now, not at the refresh
        self._state(True, "SignedIn", f"signed in to {redact_url(signin.issuer)} "
                    f"({' '.join(signin.scope) or 'no scope'})", False)
        self._wake.set()

    # -- the shared store ---------------------------------------------------------------------

    def _from_store(self, doc: dict[str, Any], store: RedisTokenStore) -> StoredSignIn:
        return StoredSignIn.from_json(doc, Path(store.display))

    async def _store_request(self, store: RedisTokenStore) -> TokenResponse | TokenFailure:
        """Under the store's lock: the stored sign-in's fresh token if another replica got
        one, else a refresh with the stored refresh token, saved there before it is used."""
        wait = self._config.credential_wait
        try:
            async with store.lock(wait):
                doc = await store.load_signin()
                if doc is None:
                    return TokenFailure(True, "invalid_grant", "no sign-in is in the store")
                stored = self._from_store(doc, store)
                current = self._signin
                if current is None or stored.signin_id != current.signin_id or (
                        stored.refresh_token != current.refresh_token):
                    self._take_client(stored)
                    fresh = self._fresh(stored)
                    if fresh is not None:
                        self._answer_for = stored
                        return fresh
                if stored.refresh_token is None:
                    return TokenFailure(True, "invalid_grant", "no refresh token is stored")
                outcome = await self._grant(stored.refresh_token,
                                            min(self._request_timeout, wait * 0.9))
                if isinstance(outcome, TokenFailure):
                    return outcome
                expires_at = (datetime.fromtimestamp(time.time() + outcome.expires_in, UTC)
                              if outcome.expires_in is not None else None)
                updated = stored.refreshed(outcome.access_token, outcome.refresh_token,
                                           expires_at, None)
                await store.save_signin(updated.to_json())
                self._signin = updated
                self._refresh_token = updated.refresh_token
                self._answer_for = updated
                return TokenResponse(outcome.access_token, outcome.expires_in, None)
        except StoreKeyMismatch as exc:
            return TokenFailure(True, "StoreKeyMismatch", str(exc))
        except CredentialsFileRefused as exc:
            return TokenFailure(True, "invalid_grant", str(exc))
        except StateError as exc:
            # Never refresh without the store: the held token serves until it expires.
            return TokenFailure(False, "store_unavailable", str(exc))

    def _take_client(self, signin: StoredSignIn) -> None:
        self._signin = signin
        self._token_url = signin.token_endpoint
        self._client_id = signin.client_id
        self._secret = signin.client_secret
        self._refresh_token = signin.refresh_token
        self._resource = signin.resource

    def _fresh(self, signin: StoredSignIn) -> TokenResponse | None:
        """The stored access token when it is not the one held and has time left."""
        held = self._credential.authorization if self._credential else None
        if held == f"Bearer {signin.access_token}":
            return None
        if signin.expires_at is None:
            return TokenResponse(signin.access_token, None, None, adopted=True)
        remaining = (signin.expires_at - datetime.now(UTC)).total_seconds()
        if remaining <= refresh_skew(remaining) + 1.0:
            return None
        return TokenResponse(signin.access_token, remaining, None, adopted=True)

    async def _check_store(self, *, initial: bool) -> None:
        """Adopt a new sign-in `login --store` put in the store (heals LoginRequired)."""
        store = self._store
        assert store is not None
        try:
            doc = await store.load_signin()
            signin = None if doc is None else self._from_store(doc, store)
        except StoreKeyMismatch as exc:
            self._last_failure = None
            self._key_mismatch(str(exc))
            return
        except CredentialsFileRefused as exc:
            self._last_failure = None
            super()._give_up("CredentialsFileRefused", str(exc))
            return
        except StateError:
            return  # the store's own status reports it; the held token serves meanwhile
        if signin is None:
            if initial or self._signin is None:
                self._last_failure = None
                super()._give_up(LOGIN_REQUIRED, f"no sign-in is stored for workload "
                                 f"{self._name} in {store.display}; run: {self._login}")
            return
        current = self._signin
        if current is not None and current.signin_id == signin.signin_id:
            return  # the same sign-in (a refresh, ours or another replica's)
        self._adopt(signin)

    async def _watch_store(self) -> None:
        while True:
            await asyncio.sleep(self._watch_interval)
            try:
                await self._check_store(initial=False)
            except Exception:  # keep watching; never log contents
                get_logger().exception("signin_store_check_failed")
