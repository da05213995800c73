"""OAuth 2.0 outgoing credential: tokens from a token endpoint, refreshed ahead of expiry.

`OAuthSource` runs the `refresh_token` grant when a refresh token file is given, else
`client_credentials` (RFC 6749 §4.4, §6), asks for the target as its `resource`
(RFC 8707) and keeps at most one token request in flight however many requests wait
for it.
The wire protocol and the verdict table live in `token_endpoint.py`.

This module must never log, report or raise the access token, refresh token or client
secret: messages carry error codes and descriptions, scrubbed of the known secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import aiohttp
from yarl import URL

from ..config import ProxyConfig
from ..errors import CredentialInvalid, CredentialRetrying, StateError, StoreKeyMismatch
from ..log import get_logger, redact_url
from ..tls import client_context
from .base import (
    INVALID_RETRY_AFTER,
    TOKEN_LOADED,
    Credential,
    CredentialReporter,
    RefreshListener,
    ReportOnChange,
    cancel_task,
)
from .files import WATCH_INTERVAL, FileWatch, file_signature, read_secret_file, warn_if_shared
from .token_endpoint import (
    MAX_TOKEN_RESPONSE,
    TokenFailure,
    TokenResponse,
    backoff_delay,
    classify_token_response,
    parse_token_response,
    refresh_skew,
    token_request,
    write_secret_atomically,
)
from .token_store import TokenSet, TokenStore, seed_digest

# Defaults, overridable per source (tests shorten them).
BACKOFF_BASE = 1.0  # first retry waits up to this long (full jitter)
BACKOFF_CAP = 30.0  # longest wait between retries before the source reports retrying
SLOW_BACKOFF_CAP = 300.0  # longest wait once it reports retrying: keep trying, gently
REQUEST_TIMEOUT = 30.0  # whole token request, connect to last byte
MIN_REFRESH_DELAY = 1.0  # never refresh ahead more often than this (expires_in: 0 exists)


def _default_session(config: ProxyConfig, timeout: float) -> aiohttp.ClientSession:
    context = client_context(config.ca_file)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context, limit=4),
        timeout=aiohttp.ClientTimeout(total=timeout),
        middlewares=(),
        trust_env=False,
    )


# --- The source -------------------------------------------------------------------------


class OAuthSource:
    """`--oauth-*`: access tokens from a token endpoint, refreshed before they expire."""

    can_refresh = True

    def __init__(
        self,
        config: ProxyConfig,
        *,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        slow_backoff_cap: float = SLOW_BACKOFF_CAP,
        request_timeout: float = REQUEST_TIMEOUT,
        min_refresh_delay: float = MIN_REFRESH_DELAY,
        watch_interval: float = WATCH_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        token_store: TokenStore | None = None,
    ) -> None:
        self._config = config
        # A subclass with another home for its client (a stored sign-in) fills these in.
        self._token_url = config.oauth_token_url or ""
        self._client_id = config.oauth_client_id or ""
        self._secret_path = _as_path(config.oauth_client_secret_file)
        self._refresh_path = _as_path(config.oauth_refresh_token_file)
        self._resource = str(URL(config.target_url).with_query(None).with_fragment(None))
        self.description = f"OAuth token endpoint {redact_url(self._token_url)}"
        self.fix = ("renew the OAuth client or refresh token files "
                    "(--oauth-client-secret-file, --oauth-refresh-token-file)")
        self._session_factory = session_factory or (
            lambda: _default_session(config, request_timeout))
        self._backoff = (backoff_base, backoff_cap, slow_backoff_cap)
        self._request_timeout = request_timeout
        self._min_refresh_delay = min_refresh_delay
        self._watch_interval = watch_interval
        self._clock = clock
        self._rand = rand
        # Replicas sharing a store: it holds the tokens (files only seed it), one refresh
        # at a time under its lock, and a rotated refresh token is saved before use.
        self._token_store = token_store
        self._shared_refresh: str | None = None

        self._state = ReportOnChange()
        self._session: aiohttp.ClientSession | None = None
        self._secret: str | None = None
        self._refresh_token: str | None = None
        self._storing = False  # a rotated refresh token is being written to its file
        self._watches = [FileWatch(p) for p in (self._secret_path, self._refresh_path) if p]
        self._warned: set[Path] = set()
        self._credential: Credential | None = None
        self._version = 0
        self._expires_at: float | None = None
        self._refresh_at: float | None = None
        self._rejected: int | None = None  # version the target answered 401 to
        # Failure state of the current run of failures.
        self._permanent: tuple[str, str] | None = None  # (reason, message)
        # Given up after `auth_give_up_after` of transient failures (not a refusal): still
        # retried every `auth_slow_retry`, so an endpoint that comes back heals the source.
        self._slow = False
        self._failures = 0
        self._first_failure_at: float | None = None
        self._next_attempt_at: float | None = None
        self._last_failure: TokenFailure | None = None
        self._retrying = False
        self._attempts = 0
        self._last_ok = False
        self._inflight: asyncio.Task[None] | None = None
        self._done = asyncio.Condition()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Told of every token-endpoint outcome ("success" with the token's lifetime,
        # "transient_error", "refused") and of a token taken without one (TOKEN_LOADED):
        # the metrics hang here, nothing on the hot path.
        self.refresh_listener: RefreshListener | None = None

    # -- CredentialSource ------------------------------------------------------------

    @property
    def current_version(self) -> int | None:
        if self._permanent is not None or self._retrying or self._credential is None:
            return None
        return self._credential.version

    async def start(self, report: CredentialReporter) -> None:
        self._state.attach(report)
        self._session = self._session_factory()
        self._load_files(initial=True)
        await self._before_drive()
        self._tasks = [
            asyncio.create_task(self._drive(), name="oauth-refresh"),
            asyncio.create_task(self._watch_files(), name="oauth-file-watch"),
        ]

    async def _before_drive(self) -> None:
        """What a subclass must know before the refresh driver first looks (no-op here)."""

    async def close(self) -> None:
        for task in (*self._tasks, self._inflight):
            await cancel_task(task)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    def ready(self) -> Credential | None:
        return self._usable(self._clock())  # get()'s first answer when it has one

    async def get(self) -> Credential:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.credential_wait
        seen: int | None = None
        while True:
            now = self._clock()
            self._assess(now)
            usable = self._usable(now)
            if usable is not None:
                return usable
            if self._permanent is not None:
                raise CredentialInvalid(*self._permanent, retry_after=INVALID_RETRY_AFTER)
            if self._retrying:
                raise self._retrying_error(now)
            if seen is not None and self._attempts > seen and self._last_ok and self._credential:
                return self._credential  # brand new, even if its lifetime is already short
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._retrying_error(now, "TokenRefreshPending")
            if self._in_backoff(now):
                assert self._next_attempt_at is not None
                if self._next_attempt_at - now > remaining:
                    raise self._retrying_error(now, "TokenRefreshPending")
            else:
                self._start_attempt()
            seen = self._attempts
            await self._wait_attempt(seen, remaining)

    async def after_unauthorized(self, used: Credential) -> Credential | None:
        current = self._credential
        if current is not None and current.version > used.version:
            return current if self.current_version is not None else None
        if self._permanent is not None:
            return None
        self._rejected = used.version
        now = self._clock()
        if self._in_backoff(now):
            return None
        seen = self._attempts
        self._start_attempt()
        with contextlib.suppress(CredentialRetrying):
            await self._wait_attempt(seen, self._config.credential_wait)
        current = self._credential
        if current is not None and current.version > used.version and self._last_ok:
            return current
        return None

    def store_recovered(self) -> None:
        """The shared store answers again: a refresh it held up is retried at once, not
        after a backoff that grew while the store was away."""
        if self._last_failure is not None and self._last_failure.code == "store_unavailable":
            self._next_attempt_at = None
            self._wake.set()

    # -- waiting and scheduling ---------------------------------------------------------

    def _usable(self, now: float) -> Credential | None:
        cred = self._credential
        if cred is None or self._permanent is not None or cred.version == self._rejected:
            return None
        if self._expires_at is not None and now >= self._expires_at:
            return None
        return cred

    def _in_backoff(self, now: float) -> bool:
        return self._next_attempt_at is not None and now < self._next_attempt_at

    def _retrying_error(self, now: float, reason: str = "TokenRefreshRetrying"
                        ) -> CredentialRetrying:
        wait = (self._next_attempt_at or now) - now
        message = (self._last_failure.message() if self._last_failure
                   else "waiting for the token endpoint")
        return CredentialRetrying(reason, self._scrub(message), retry_after=max(1.0, wait))

    def _start_attempt(self) -> None:
        """Single flight: join the token request in flight, or start one."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._attempt(), name="oauth-token-request")

    async def _wait_attempt(self, seen: int, within: float) -> None:
        async def finished() -> None:
            async with self._done:
                await self._done.wait_for(lambda: self._attempts > seen)

        try:
            await asyncio.wait_for(finished(), max(within, 0.0))
        except TimeoutError:
            raise self._retrying_error(self._clock(), "TokenRefreshPending") from None

    def _next_due(self, now: float) -> float | None:
        """When the driver should next act: an attempt, or a report that falls due."""
        if self._permanent is not None:
            # A refusal is healed only by a change of the files; a give-up after transient
            # failures also by the slow retry.
            return self._next_attempt_at if self._slow else None
        if self._first_failure_at is not None:
            moments = [self._next_attempt_at or now,
                       self._first_failure_at + self._config.auth_give_up_after]
            if not self._retrying:
                moments.append(self._first_failure_at + self._config.auth_retrying_after)
            if self._expires_at is not None:
                moments.append(self._expires_at)
            return min(moments)
        if self._credential is None or self._credential.version == self._rejected:
            return now
        return self._refresh_at

    async def _drive(self) -> None:
        """Refresh ahead of expiry, retry after failures, report when deadlines pass."""
        while True:
            self._wake.clear()
            now = self._clock()
            self._assess(now)
            due = self._next_due(now)
            idle = self._inflight is None or self._inflight.done()
            if idle and due is not None and due <= now and not self._in_backoff(now) and (
                    self._permanent is None or self._slow):
                self._start_attempt()
                idle = False
            if not idle:
                assert self._inflight is not None
                await asyncio.wait({self._inflight})
                continue
            timeout = None if due is None else max(due - now, 0.001)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    # -- one token request -----------------------------------------------------------------

    async def _attempt(self) -> None:
        try:
            outcome = await self._request_token()
        except Exception as exc:  # a bug must not wedge waiters; never log secrets
            get_logger().exception("token_request_bug", endpoint=self.description)
            outcome = TokenFailure(False, "error", type(exc).__name__)
        now = self._clock()
        if isinstance(outcome, TokenResponse):
            await self._succeeded(outcome, now)
        else:
            self._failed(outcome, now)
        self._attempts += 1
        async with self._done:
            self._done.notify_all()
        self._wake.set()

    async def _request_token(self) -> TokenResponse | TokenFailure:
        if self._token_store is not None:
            return await self._shared_request(self._token_store)
        return await self._grant(self._grant_refresh_token(), self._request_timeout)

    async def _shared_request(self, store: TokenStore) -> TokenResponse | TokenFailure:
        """Under the store's lock: adopt a token another replica got, else refresh and
        save the answer (a rotated refresh token included) before anyone uses it."""
        wait = self._config.credential_wait
        try:
            async with store.lock(wait):
                stored = await store.load()
                seed = seed_digest(self._refresh_token) if self._refresh_token else None
                if stored is None and self._shared_refresh is not None:
                    # The store lost what it held (restarted without persistence): what
                    # this replica saved last is newer than any file.
                    stored = TokenSet(None, self._shared_refresh, None, seed)
                    await store.save(stored)
                elif seed is not None and (stored is None or stored.seed != seed):
                    # The file seeds the store: it holds nothing yet, or the user changed
                    # the file since it was seeded.
                    stored = TokenSet(None, self._refresh_token, None, seed)
                    await store.save(stored)
                adopted = self._adoptable(stored)
                if adopted is not None:
                    return adopted
                refresh = stored.refresh_token if stored and self._refresh_path else None
                # The lease is `credential_wait`: the request must end within it.
                outcome = await self._grant(refresh, min(self._request_timeout, wait * 0.9))
                if isinstance(outcome, TokenFailure):
                    return outcome
                expires_at = (time.time() + outcome.expires_in
                              if outcome.expires_in is not None else None)
                kept = outcome.refresh_token or refresh
                await store.save(TokenSet(outcome.access_token, kept, expires_at,
                                          stored.seed if stored else seed))
                self._shared_refresh = kept
                # The refresh token is saved in the store, not written back to the file.
                return TokenResponse(outcome.access_token, outcome.expires_in, None)
        except StoreKeyMismatch as exc:
            return TokenFailure(True, "StoreKeyMismatch", str(exc))
        except StateError as exc:
            # Never refresh without the store: the held token serves until it expires.
            return TokenFailure(False, "store_unavailable", str(exc))

    def _adoptable(self, stored: TokenSet | None) -> TokenResponse | None:
        """The stored access token, when it is not the one held and still fresh."""
        if stored is None or not stored.access_token:
            return None
        held = self._credential.authorization.removeprefix("Bearer ") if (
            self._credential) else None
        if stored.access_token == held:
            return None  # ours: expiring, or the target refused it; refresh it
        if stored.expires_at is None:
            return TokenResponse(stored.access_token, None, None, adopted=True)
        remaining = stored.expires_at - time.time()
        if remaining <= 0:
            return None
        return TokenResponse(stored.access_token, remaining, None, adopted=True)

    async def _grant(self, refresh_token: str | None, timeout: float
                     ) -> TokenResponse | TokenFailure:
        assert self._session is not None
        headers, form = token_request(
            client_id=self._client_id, secret=self._secret,
            refresh_token=refresh_token,
            resource=self._resource, scopes=self._config.oauth_scopes,
        )
        status: int | None = None
        answer_headers: Mapping[str, str] | None = None
        body: bytes | None = None
        try:
            async with asyncio.timeout(timeout):
                async with self._session.post(self._token_url, data=form, headers=headers,
                                              allow_redirects=False) as response:
                    status, answer_headers = response.status, response.headers
                    body = await _read_limited(response, MAX_TOKEN_RESPONSE)
        except (TimeoutError, aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            failure = classify_token_response(None, None, None, exc)
            assert failure is not None
            return failure
        failure = classify_token_response(status, answer_headers, body, None)
        if failure is not None:
            return failure
        parsed = parse_token_response(body)
        assert parsed is not None
        return parsed

    def _grant_refresh_token(self) -> str | None:
        """The refresh token to grant with; None asks for client_credentials."""
        return self._refresh_token if self._refresh_path else None

    async def _keep(self, answer: TokenResponse) -> None:
        """Persist what a successful answer changed: here a rotated refresh token."""
        if (answer.refresh_token and self._refresh_path is not None
                and answer.refresh_token != self._refresh_token):
            await self._store_refresh_token(answer.refresh_token)

    async def _succeeded(self, answer: TokenResponse, now: float) -> None:
        await self._keep(answer)
        authorization = f"Bearer {answer.access_token}"
        if self._credential is None or self._credential.authorization != authorization:
            self._version += 1
            self._credential = Credential(authorization, self._version)
        self._rejected = None
        if answer.expires_in is not None:
            self._expires_at = now + answer.expires_in
            ahead = answer.expires_in - refresh_skew(answer.expires_in)
            self._refresh_at = now + max(ahead, self._min_refresh_delay)
        else:
            self._expires_at = self._refresh_at = None  # refreshed on a 401 only
        self._reset_failures()
        self._last_ok = True
        self._tell(TOKEN_LOADED if answer.adopted else "success", answer.expires_in)
        self._state(True, "TokenObtained", f"access token obtained from {self.description}",
                    False)

    async def _store_refresh_token(self, token: str) -> None:
        self._refresh_token = token  # in memory first: the old one may be dead already
        assert self._refresh_path is not None
        # While the write runs in its thread, the file still holds the old token: the
        # watcher must not read it back over the new one.
        self._storing = True
        try:
            await asyncio.to_thread(write_secret_atomically, self._refresh_path, token)
        except OSError as exc:
            get_logger().warning("refresh_token_not_saved", path=str(self._refresh_path),
                                 error=exc.strerror or type(exc).__name__)
            return
        finally:
            self._storing = False
        for watch in self._watches:
            if watch.path == self._refresh_path:
                watch.mark(file_signature(self._refresh_path))

    def _failed(self, failure: TokenFailure, now: float) -> None:
        self._last_ok = False
        self._last_failure = failure
        self._tell("refused" if failure.permanent else "transient_error", None)
        if failure.code == "StoreKeyMismatch":
            self._key_mismatch(failure.description or failure.code)
            return
        if self._slow and not failure.permanent:
            # Still down after giving up: stay given up, try again in a while.
            self._next_attempt_at = now + max(self._config.auth_slow_retry,
                                              failure.retry_after or 0.0)
            get_logger().info("token_refresh_slow_retry", endpoint=self.description,
                              error=failure.code,
                              delay=round(self._next_attempt_at - now, 3))
            return
        if failure.permanent:
            self._give_up("TokenRefreshFailed", failure.message())
            get_logger().warning("token_refresh_failed", endpoint=self.description,
                                 error=failure.code, permanent=True)
            return
        if self._first_failure_at is None:
            self._first_failure_at = now
        self._failures += 1
        base, cap, slow_cap = self._backoff
        delay = backoff_delay(self._failures, base, slow_cap if self._retrying else cap,
                              self._rand)
        if failure.retry_after is not None:
            delay = max(delay, failure.retry_after)
        self._next_attempt_at = now + delay
        get_logger().info("token_refresh_retry", endpoint=self.description,
                          error=failure.code, failures=self._failures, delay=round(delay, 3))
        self._assess(now)

    def _tell(self, outcome: str, expires_in: float | None) -> None:
        if self.refresh_listener is not None:
            try:
                self.refresh_listener(outcome, expires_in)
            except Exception as exc:  # a metrics bug must not break refreshing
                get_logger().warning("refresh_listener_failed", error=repr(exc))

    def _assess(self, now: float) -> None:
        """Turn elapsed time into state: retrying after a while, given up after longer."""
        if self._permanent is not None or self._first_failure_at is None:
            return
        if self._usable(now) is not None:
            return  # the current token still works; keep retrying quietly
        elapsed = now - self._first_failure_at
        failure = self._last_failure.message() if self._last_failure else "no token"
        if elapsed >= self._config.auth_give_up_after:
            self._give_up("TokenRefreshFailed",
                          f"{failure}; gave up after {elapsed:.0f} s of failures, "
                          f"retrying every {self._config.auth_slow_retry:g} s")
            self._slow = True
            self._next_attempt_at = now + self._config.auth_slow_retry
        elif elapsed >= self._config.auth_retrying_after and not self._retrying:
            self._retrying = True
            self._state(False, "TokenRefreshRetrying",
                        self._scrub(f"{failure}; retrying since {elapsed:.0f} s"), False)

    def _give_up(self, reason: str, message: str) -> None:
        message = self._scrub(message)
        self._permanent = (reason, message)
        self._slow = False
        self._next_attempt_at = None
        self._state(False, reason, message, True)

    def _key_mismatch(self, problem: str) -> None:
        """Not this replica's store key (or not its workload's tokens): give up, and say
        so once at ERROR (a watch that finds it again each second logs nothing more)."""
        if self._permanent is None or self._permanent[0] != "StoreKeyMismatch":
            get_logger().error("store_key_mismatch", endpoint=self.description,
                               problem=problem)
        self._give_up("StoreKeyMismatch", problem)

    def _reset_failures(self) -> None:
        self._permanent = None
        self._slow = False
        self._failures = 0
        self._first_failure_at = None
        self._next_attempt_at = None
        self._retrying = False

    def _scrub(self, text: str) -> str:
        """Belt and braces: a server may echo what it was sent into its description."""
        for secret in (self._secret, self._refresh_token, self._shared_refresh):
            if secret:
                text = text.replace(secret, "<redacted>")
        if self._credential is not None:
            text = text.replace(self._credential.authorization.removeprefix("Bearer "),
                                "<redacted>")
        return text

    # -- the secret and refresh token files ------------------------------------------------

    def _load_files(self, *, initial: bool) -> bool:
        """(Re-)read changed files; True when something the grant uses changed."""
        changed = False
        touched = False  # a file's identity (mtime, size, inode) changed, contents or not
        for watch in self._watches:
            if self._storing and watch.path == self._refresh_path:
                continue  # our own write in flight (see _store_refresh_token)
            if not initial and not watch.changed():
                continue
            before = watch.signature
            what = "client secret file" if watch.path == self._secret_path else (
                "refresh token file")
            result = read_secret_file(watch.path, what, spaces=True)
            watch.mark(result.signature)
            touched = touched or result.signature != before
            if watch.path not in self._warned and warn_if_shared(
                    watch.path, result.signature, what):
                self._warned.add(watch.path)
            current = self._secret if watch.path == self._secret_path else self._refresh_token
            if result.text is None:
                if initial or current is None:
                    self._give_up(result.reason, result.message)
                continue  # keep what we had: a file being rewritten may be empty briefly
            if result.text != current:
                changed = True
                if watch.path == self._secret_path:
                    self._secret = result.text
                else:
                    self._refresh_token = result.text
        missing = (self._secret_path is not None and self._secret is None) or (
            self._refresh_path is not None and self._refresh_token is None)
        if initial or missing:
            return changed
        # After a give-up, any change of a file is the user's word to try again, even
        # one that rewrote the same contents (a `touch`, a secret manager's re-sync).
        if (changed or (touched and self._permanent is not None)) and (
                self._permanent is not None or self._first_failure_at is not None
                or self._rejected is not None):
            # The user fixed something: forget the failures and try again at once.
            self._reset_failures()
            self._last_failure = None
            self._wake.set()
        return changed

    async def _watch_files(self) -> None:
        if not self._watches:
            return
        while True:
            await asyncio.sleep(self._watch_interval)
            try:
                self._load_files(initial=False)
            except Exception:  # keep watching; never log contents
                get_logger().exception("oauth_file_check_failed")


def _as_path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            break  # a token answer is small; the rest is not one
        chunks.append(chunk)
    return b"".join(chunks)
