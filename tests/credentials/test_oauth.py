"""OAuth credential source against a real loopback token endpoint, and its classifier."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import pytest
import trustme
from aiohttp import web
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

from proxy.config import ProxyConfig
from proxy.credentials.oauth import OAuthSource
from proxy.credentials.token_endpoint import (
    TokenFailure,
    backoff_delay,
    basic_client_auth,
    classify_token_response,
    parse_retry_after,
    refresh_skew,
)
from proxy.errors import CredentialInvalid, CredentialRetrying

from helpers import RawConn, RawUpstreamFactory, eventually

TARGET = "http://127.0.0.1:9/mcp?api_key=k"
RESOURCE = "http://127.0.0.1:9/mcp"
SECRET = "s3cr:et&/+ x"
CLIENT = "my client:1"
REFRESH = "refresh-0-ORIGINAL"

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


def ok(token: str, expires_in: float | None = 3600, refresh: str | None = None) -> Answer:
    async def answer(_: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if expires_in is not None:
            body["expires_in"] = expires_in
        if refresh is not None:
            body["refresh_token"] = refresh
        return web.json_response(body)
    return answer


def html(status: int) -> Answer:
    async def answer(_: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text="<html>Access denied</html>",
                            content_type="text/html")
    return answer


def oauth_error(status: int, code: str, description: str) -> Answer:
    async def answer(_: web.Request) -> web.StreamResponse:
        return web.json_response({"error": code, "error_description": description},
                                 status=status)
    return answer


def plain(status: int, headers: dict[str, str] | None = None) -> Answer:
    async def answer(_: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text="busy", headers=headers)
    return answer


@dataclass
class Seen:
    headers: dict[str, str]
    form: dict[str, str]


@dataclass
class TokenEndpoint:
    """A loopback token endpoint answering from a script, recording what it received."""

    url: str = ""
    answers: list[Answer] = field(default_factory=list)
    default: Answer = field(default_factory=lambda: ok("access-default"))
    requests: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        self.requests.append(Seen(dict(request.headers), {k: str(v) for k, v in form.items()}))
        self.arrived.set()
        answer = self.answers.pop(0) if self.answers else self.default
        return await answer(request)

    def hang(self) -> Answer:
        async def answer(_: web.Request) -> web.StreamResponse:
            await self.release.wait()  # released at teardown
            return web.Response(status=503)
        return answer

    async def next_request(self, count: int) -> Seen:
        async with asyncio.timeout(5):
            while len(self.requests) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.requests[count - 1]


@pytest.fixture
async def endpoint(aiohttp_server: AiohttpServer) -> AsyncIterator[TokenEndpoint]:
    ep = TokenEndpoint()
    app = web.Application()
    app.router.add_post("/token", ep.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    ep.url = str(server.make_url("/token"))
    yield ep
    ep.release.set()


class Reports:
    """What the source told the auth monitor, with a way to wait for the next word."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, str, str, bool]] = []
        self._event = asyncio.Event()

    def __call__(self, available: bool, reason: str, message: str, permanent: bool) -> None:
        self.calls.append((available, reason, message, permanent))
        self._event.set()

    async def wait_for(self, predicate: Callable[[tuple[bool, str, str, bool]], bool],
                       within: float = 5.0) -> tuple[bool, str, str, bool]:
        async with asyncio.timeout(within):
            while not (self.calls and predicate(self.calls[-1])):
                self._event.clear()
                await self._event.wait()
        return self.calls[-1]


@pytest.fixture
async def make_source(tmp_path: Path) -> AsyncIterator[Callable[..., OAuthSource]]:
    sources: list[OAuthSource] = []

    def factory(token_url: str, *, secret: str | None = SECRET, refresh: str | None = None,
                scopes: tuple[str, ...] = (), tunables: dict[str, Any] | None = None,
                **config: Any) -> OAuthSource:
        files: dict[str, Any] = {}
        if secret is not None:
            files["oauth_client_secret_file"] = write_secret(tmp_path / "secret", secret)
        if refresh is not None:
            files["oauth_refresh_token_file"] = write_secret(tmp_path / "refresh", refresh)
        config.setdefault("credential_wait", 2.0)
        cfg = ProxyConfig(target_url=TARGET, oauth_token_url=token_url, oauth_client_id=CLIENT,
                          oauth_scopes=scopes, state_dir=tmp_path / "state", **files, **config)
        knobs: dict[str, Any] = {"backoff_base": 0.01, "backoff_cap": 0.05,
                                 "slow_backoff_cap": 0.1, "request_timeout": 0.5,
                                 "min_refresh_delay": 0.05,
                                 "watch_interval": 0.02}
        knobs.update(tunables or {})
        source = OAuthSource(cfg, **knobs)
        sources.append(source)
        return source

    yield factory
    for source in sources:
        await source.close()


def write_secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    os.chmod(path, 0o600)
    return path


# --- classification table ---------------------------------------------------------------

GOOD = json.dumps({"access_token": "at", "token_type": "bearer", "expires_in": 60}).encode()


def error_body(code: str) -> bytes:
    return json.dumps({"error": code, "error_description": "why"}).encode()


CERT_ERROR = aiohttp.ClientConnectorCertificateError(
    aiohttp.client_reqrep.ConnectionKey("h", 443, True, True, None, None, None),
    ssl.SSLCertVerificationError("certificate verify failed"),
)
TABLE: list[tuple[str, int | None, dict[str, str], bytes | None, BaseException | None,
                  bool | None, str | None]] = [
    # name, status, headers, body, exc, permanent (None = success), code
    ("json success", 200, {}, GOOD, None, None, None),
    ("200 without access_token", 200, {}, b'{"token_type":"Bearer"}', None, False,
     "no_access_token"),
    ("200 html", 200, {}, b"<html>portal</html>", None, False, "no_access_token"),
    ("200 non-bearer token type", 200, {}, b'{"access_token":"a","token_type":"mac"}', None,
     False, "no_access_token"),
    ("redirect", 302, {"Location": "https://elsewhere/token"}, b"", None, True, "redirect"),
    ("invalid_grant", 400, {}, error_body("invalid_grant"), None, True, "invalid_grant"),
    ("invalid_client", 401, {}, error_body("invalid_client"), None, True, "invalid_client"),
    ("unauthorized_client", 400, {}, error_body("unauthorized_client"), None, True,
     "unauthorized_client"),
    ("invalid_scope", 400, {}, error_body("invalid_scope"), None, True, "invalid_scope"),
    ("unsupported_grant_type", 400, {}, error_body("unsupported_grant_type"), None, True,
     "unsupported_grant_type"),
    ("invalid_request", 400, {}, error_body("invalid_request"), None, True, "invalid_request"),
    ("temporarily_unavailable", 400, {}, error_body("temporarily_unavailable"), None, False,
     "temporarily_unavailable"),
    ("html 403 from a WAF", 403, {}, b"<html>blocked</html>", None, False, "http_403"),
    ("html 401", 401, {}, b"<html>login</html>", None, False, "http_401"),
    ("json without error", 400, {}, b'{"message":"nope"}', None, False, "http_400"),
    ("429", 429, {"Retry-After": "7"}, b"", None, False, "rate_limited"),
    ("500", 500, {}, b"oops", None, False, "http_500"),
    ("503", 503, {"Retry-After": "3"}, b"", None, False, "http_503"),
    ("timeout", None, {}, None, TimeoutError(), False, "timeout"),
    ("reset", None, {}, None, aiohttp.ServerDisconnectedError(), False, "network"),
    ("refused", None, {}, None, ConnectionRefusedError(111, "refused"), False, "network"),
    ("tls certificate", None, {}, None, CERT_ERROR, True, "tls"),
    ("bare ssl verify error", None, {}, None,
     ssl.SSLCertVerificationError("self-signed"), True, "tls"),
]


@pytest.mark.parametrize(("name", "status", "headers", "body", "exc", "permanent", "code"),
                         TABLE, ids=[row[0] for row in TABLE])
def test_classification_table(name: str, status: int | None, headers: dict[str, str],
                              body: bytes | None, exc: BaseException | None,
                              permanent: bool | None, code: str | None) -> None:
    """Each token endpoint answer is retried or given up on as RFC 6749 §5.2 suggests."""
    failure = classify_token_response(status, headers, body, exc)
    if permanent is None:
        assert failure is None
        return
    assert failure is not None
    assert (failure.permanent, failure.code) == (permanent, code)


def test_retry_after_is_honoured_in_classification() -> None:
    """A 429's Retry-After, in seconds or as a date, tells when to ask again."""
    failure = classify_token_response(429, {"Retry-After": "7"}, b"", None)
    assert failure is not None and failure.retry_after == 7
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None


def test_refused_grant_message_names_the_code() -> None:
    """A refused grant reads 'token endpoint refused the grant: <code> (<description>)'."""
    failure = classify_token_response(400, {}, error_body("invalid_grant"), None)
    assert failure is not None
    assert failure.message() == "token endpoint refused the grant: invalid_grant (why)"


def test_backoff_and_skew_helpers() -> None:
    """Retries back off exponentially up to a cap; tokens refresh before they expire."""
    assert backoff_delay(1, 1.0, 30.0, lambda: 1.0) == 1.0
    assert backoff_delay(4, 1.0, 30.0, lambda: 1.0) == 8.0
    assert backoff_delay(40, 1.0, 30.0, lambda: 1.0) == 30.0
    assert backoff_delay(3, 1.0, 30.0, lambda: 0.0) == 0.0
    assert refresh_skew(3600) == 30.0 and refresh_skew(60) == 6.0


def test_basic_auth_form_encodes_first() -> None:
    """Client id and secret with reserved characters are form-encoded before base64."""
    value = basic_client_auth("a b:c", "p&ss/w")
    assert base64.b64decode(value.removeprefix("Basic ")) == b"a+b%3Ac:p%26ss%2Fw"


# --- against the endpoint ------------------------------------------------------------------


async def test_client_credentials_request(
    endpoint: TokenEndpoint, make_source: Callable[..., OAuthSource]
) -> None:
    """A confidential client asks with Basic auth, the target as resource and its scopes."""
    endpoint.answers = [ok("access-1")]
    source = make_source(endpoint.url, scopes=("read", "write"))
    reports = Reports()
    await source.start(reports)
    credential = await source.get()
    assert credential.authorization == "Bearer access-1"
    seen = endpoint.requests[0]
    assert seen.form == {"grant_type": "client_credentials", "resource": RESOURCE,
                         "scope": "read write"}
    decoded = base64.b64decode(seen.headers["Authorization"].removeprefix("Basic ")).decode()
    assert decoded == f"{quote_plus(CLIENT, safe='')}:{quote_plus(SECRET, safe='')}"
    assert reports.calls[-1][:2] == (True, "TokenObtained")
    assert source.current_version == credential.version
    assert len(endpoint.requests) == 1  # cached: no request per get()
    await source.get()
    assert len(endpoint.requests) == 1


async def test_public_client_refresh_grant_rotates_the_file(
    endpoint: TokenEndpoint, make_source: Callable[..., OAuthSource], tmp_path: Path
) -> None:
    """A rotated refresh token is saved to its file (0600) and used for the next refresh."""
    endpoint.answers = [ok("access-1", refresh="refresh-1-ROTATED"), ok("access-2")]
    source = make_source(endpoint.url, secret=None, refresh=REFRESH)
    await source.start(Reports())
    first = await source.get()
    seen = endpoint.requests[0]
    assert "Authorization" not in seen.headers
    assert seen.form == {"grant_type": "refresh_token", "refresh_token": REFRESH,
                         "resource": RESOURCE, "client_id": CLIENT}
    saved = tmp_path / "refresh"
    assert saved.read_text().strip() == "refresh-1-ROTATED"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    second = await source.after_unauthorized(first)
    assert second is not None and second.authorization == "Bearer access-2"
    assert endpoint.requests[1].form["refresh_token"] == "refresh-1-ROTATED"


async def test_token_is_refreshed_before_it_expires(
    endpoint: TokenEndpoint, make_source: Callable[..., OAuthSource]
) -> None:
    """A short-lived token is replaced before its lifetime runs out, without a request."""
    endpoint.answers = [ok("access-1", expires_in=0.5), ok("access-2")]
    source = make_source(endpoint.url)
    await source.start(Reports())
    assert (await source.get()).authorization == "Bearer access-1"
    await endpoint.next_request(2)
    async def refreshed() -> bool:
        return (await source.get()).authorization == "Bearer access-2"

    # The refresh runs in the background: nothing to wait on but the answer itself.
    await eventually(refreshed, what="the background refresh")


async def test_hundred_waiters_share_one_refresh(
    endpoint: TokenEndpoint, make_source: Callable[..., OAuthSource], tmp_path: Path
) -> None:
    """However many requests wait for an expired token, the endpoint is asked once."""
    now = [1000.0]
    gate = asyncio.Event()

    async def gated(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return await ok("access-2")(request)

    endpoint.answers = [ok("access-1", expires_in=60), gated]
    source = make_source(endpoint.url, tunables={"clock": lambda: now[0]})
    await source.start(Reports())
    assert (await source.get()).authorization == "Bearer access-1"
    assert source.ready() is not None and source.ready() == await source.get()
    now[0] += 120  # expired
    assert source.ready() is None  # an expired token is never handed out without waiting
    waiters = [asyncio.ensure_future(source.get()) for _ in range(100)]
    await endpoint.next_request(2)
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert {c.authorization for c in results} == {"Bearer access-2"}
    assert len(endpoint.requests) == 2


async def test_after_unauthorized_refreshes_once(
    endpoint: TokenEndpoint, make_source: Callable[..., OAuthSource]
) -> None:
    """A 401 leads to one refresh; other 401s for the same old token reuse its result."""
    endpoint.answers = [ok("access-1"), ok("access-2")]
    source = make_source(endpoint.url)
    await source.start(Reports())
    old = await source.get()
    new_ones = await asyncio.gather(*(source.after_unauthorized(old) for _ in range(10)))
    assert {c.authorization if c else None for c in new_ones} == {"Bearer access-2"}
    assert len(endpoint.requests) == 2
    assert await source.after_unauthorized(old) == new_ones[0]
    assert len(endpoint.requests) == 2


SHAPES: list[tuple[str, Callable[[TokenEndpoint], Answer], bool, str]] = [
    ("html 403", lambda ep: html(403), False, "http_403"),
    ("html 401", lambda ep: html(401), False, "http_401"),
    ("json invalid_grant", lambda ep: oauth_error(400, "invalid_grant", "expired"), True,
     "invalid_grant"),
    ("json invalid_client", lambda ep: oauth_error(401, "invalid_client", "unknown"), True,
     "invalid_client"),
    ("429 retry-after", lambda ep: plain(429, {"Retry-After": "7"}), False, "rate_limited"),
    ("503", lambda ep: plain(503), False, "http_503"),
    ("hang", lambda ep: ep.hang(), False, "timeout"),
]


@pytest.mark.parametrize(("shape", "answer", "permanent", "code"), SHAPES,
                         ids=[s[0] for s in SHAPES])
async def test_failure_shapes_are_acted_on(
    endpoint: TokenEndpoint, make_source: Callable[..., OAuthSource],
    shape: str, answer: Callable[[TokenEndpoint], Answer], permanent: bool, code: str,
) -> None:
    """Refused grants make the workload unauthenticated; passing trouble makes it retry."""
    endpoint.default = answer(endpoint)
    # Only the hanging endpoint needs the short timeout; the others must not be cut short
    # by it on a busy machine (a 503 then looked like a timeout).
    source = make_source(endpoint.url, auth_retrying_after=0.0,
                         tunables={"request_timeout": 0.2 if shape == "hang" else 5.0})
    reports = Reports()
    await source.start(reports)
    _, reason, message, is_permanent = await reports.wait_for(lambda r: not r[0])
    assert is_permanent is permanent
    assert code in message
    if permanent:
        assert reason == "TokenRefreshFailed"
        assert message.startswith(f"token endpoint refused the grant: {code}")
        with pytest.raises(CredentialInvalid) as invalid:
            await source.get()
        assert invalid.value.retry_after > 0
    else:
        assert reason == "TokenRefreshRetrying"
        with pytest.raises(CredentialRetrying) as retrying:
            await source.get()
        assert retrying.value.reason == "TokenRefreshRetrying"
        assert retrying.value.retry_after >= (6 if code == "rate_limited" else 1)
    assert source.current_version is None


async def test_reset_connection_is_transient(
    raw_upstream: RawUpstreamFactory, make_source: Callable[..., OAuthSource]
) -> None:
    """A token endpoint that drops the connection is retried, not given up on."""
    async def reset(conn: RawConn) -> None:
        conn.writer.transport.abort()

    endpoint = await raw_upstream(reset)
    source = make_source(endpoint.url("/token"), auth_retrying_after=0.0)
    reports = Reports()
    await source.start(reports)
    last = await reports.wait_for(lambda r: not r[0])
    assert last[1] == "TokenRefreshRetrying" and last[3] is False
    assert "network" in last[2]
    await source.close()


async def test_retrying_source_recovers(
    endpoint: TokenEndpoint, make_source: Callable[..., OAuthSource]
) -> None:
    """After the endpoint comes back, the source reports available and serves tokens."""
    endpoint.default = plain(503)
    source = make_source(endpoint.url, auth_retrying_after=0.0)
    reports = Reports()
    await source.start(reports)
    await reports.wait_for(lambda r: r[1] == "TokenRefreshRetrying")
    endpoint.default = ok("access-back")
    await reports.wait_for(lambda r: r[0])
    assert (await source.get()).authorization == "Bearer access-back"


async def test_short_trouble_is_not_reported(
    endpoint: TokenEndpoint, make_source: Callable[..., OAuthSource]
) -> None:
    """Before auth_retrying_after a request waits at most credential_wait, then gets 503."""
    endpoint.default = plain(500)
    source = make_source(endpoint.url, credential_wait=0.3)
    reports = Reports()
    await source.start(reports)
    with pytest.raises(CredentialRetrying) as pending:
        await asyncio.wait_for(source.get(), 3)
    assert pending.value.reason == "TokenRefreshPending"
    assert pending.value.retry_after >= 1
    assert reports.calls == []
    endpoint.default = ok("access-1")
    assert (await asyncio.wait_for(source.get(), 3)).authorization == "Bearer access-1"


async def test_gives_up_after_long_transient_trouble(
    endpoint: TokenEndpoint, make_source: Callable[..., OAuthSource]
) -> None:
    """Transient failures that last auth_give_up_after turn into a refused source."""
    endpoint.default = plain(503)
    source = make_source(endpoint.url, auth_retrying_after=0.0, auth_give_up_after=0.2)
    reports = Reports()
    await source.start(reports)
    await reports.wait_for(lambda r: r[1] == "TokenRefreshRetrying")
    final = await reports.wait_for(lambda r: r[3])
    assert final[:2] == (False, "TokenRefreshFailed")
    assert "gave up" in final[2]
    with pytest.raises(CredentialInvalid):
        await source.get()


async def test_refused_grant_heals_when_refresh_token_file_changes(
    endpoint: TokenEndpoint, make_source: Callable[..., OAuthSource], tmp_path: Path
) -> None:
    """Writing a new refresh token fixes a refused grant without a restart."""
    endpoint.default = oauth_error(400, "invalid_grant", f"token {REFRESH} was revoked")
    source = make_source(endpoint.url, refresh=REFRESH)
    reports = Reports()
    with capture_logs() as logs:
        await source.start(reports)
        refused = await reports.wait_for(lambda r: not r[0])
        assert refused[1] == "TokenRefreshFailed" and refused[3] is True
        endpoint.default = ok("access-healed")
        write_secret(tmp_path / "refresh", "refresh-NEW-by-user")
        await reports.wait_for(lambda r: r[0])
    assert (await source.get()).authorization == "Bearer access-healed"
    assert endpoint.requests[-1].form["refresh_token"] == "refresh-NEW-by-user"
    everything = repr(reports.calls) + repr(logs)
    for secret in (REFRESH, SECRET, "access-healed", "refresh-NEW-by-user"):
        assert secret not in everything


async def test_missing_secret_file_heals(
    endpoint: TokenEndpoint, make_source: Callable[..., OAuthSource], tmp_path: Path
) -> None:
    """A client secret file that is missing at start is reported and picked up later."""
    source = make_source(endpoint.url)
    secret_file = tmp_path / "secret"
    secret_file.unlink()
    reports = Reports()
    await source.start(reports)
    assert reports.calls[-1][:2] == (False, "TokenFileMissing")
    assert str(secret_file) in reports.calls[-1][2]
    with pytest.raises(CredentialInvalid):
        await source.get()
    assert endpoint.requests == []
    write_secret(secret_file, SECRET)
    await reports.wait_for(lambda r: r[0])
    assert endpoint.requests[0].headers["Authorization"].startswith("Basic ")


async def test_untrusted_certificate_is_permanent_and_ca_file_fixes_it(
    make_source: Callable[..., OAuthSource], tmp_path: Path
) -> None:
    """An https token endpoint with an unknown CA is refused; --ca-file makes it trusted."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    app = web.Application()
    app.router.add_post("/token", ok("tls-access"))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    try:
        port = runner.addresses[0][1]
        url = f"https://127.0.0.1:{port}/token"
        untrusted = make_source(url)
        reports = Reports()
        await untrusted.start(reports)
        refused = await reports.wait_for(lambda r: not r[0])
        assert refused[1] == "TokenRefreshFailed" and refused[3] is True
        assert "TLS certificate" in refused[2]
        trusted = make_source(url, ca_file=ca_file)
        await trusted.start(Reports())
        assert (await trusted.get()).authorization == "Bearer tls-access"
        await untrusted.close()
        await trusted.close()
    finally:
        await runner.cleanup()


def test_failure_message_for_transient_answer() -> None:
    """A transient failure's message names the status and code, for the status file."""
    assert TokenFailure(False, "http_503", None, 503).message() == (
        "token endpoint answered 503: http_503")


def _rewrite_same(path: Path) -> None:
    path.write_bytes(path.read_bytes())  # same contents, new mtime


def _touch(path: Path) -> None:
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))


def _replace_same(path: Path) -> None:
    fresh = path.with_suffix(".new")
    fresh.write_bytes(path.read_bytes())
    os.chmod(fresh, 0o600)
    os.replace(fresh, path)  # same contents, another inode


@pytest.mark.parametrize("change", [_rewrite_same, _touch, _replace_same],
                         ids=["rewritten", "touched", "replaced"])
async def test_a_source_that_gave_up_retries_when_its_file_changes_at_all(
    endpoint: TokenEndpoint, make_source: Callable[..., OAuthSource], tmp_path: Path,
    change: Callable[[Path], None],
) -> None:
    """After giving up on a token endpoint that was down, rewriting, touching or replacing
    the refresh token file with the same contents retries at once and heals the source."""
    endpoint.default = plain(503)
    source = make_source(endpoint.url, refresh=REFRESH, auth_retrying_after=0.0,
                         auth_give_up_after=0.2, auth_slow_retry=300.0)
    reports = Reports()
    await source.start(reports)
    gave_up = await reports.wait_for(lambda r: r[3])
    assert gave_up[:2] == (False, "TokenRefreshFailed")
    endpoint.default = ok("access-after-touch")
    change(tmp_path / "refresh")
    await reports.wait_for(lambda r: r[0])
    assert (await source.get()).authorization == "Bearer access-after-touch"
    assert endpoint.requests[-1].form["refresh_token"] == REFRESH


async def test_a_source_that_gave_up_keeps_retrying_slowly_and_heals_by_itself(
    endpoint: TokenEndpoint, make_source: Callable[..., OAuthSource]
) -> None:
    """After `auth_give_up_after` of transient failures the source still asks the token
    endpoint every `auth_slow_retry`, and a token endpoint that comes back heals it with
    no file change and no restart."""
    endpoint.default = plain(503)
    source = make_source(endpoint.url, auth_retrying_after=0.0, auth_give_up_after=0.2,
                         auth_slow_retry=0.3)
    reports = Reports()
    await source.start(reports)
    gave_up = await reports.wait_for(lambda r: r[3])
    assert "retrying every 0.3 s" in gave_up[2]
    asked = len(endpoint.requests)
    await endpoint.next_request(asked + 1)  # still asking, slowly, while down
    with pytest.raises(CredentialInvalid):
        await source.get()
    endpoint.default = ok("access-came-back")
    await reports.wait_for(lambda r: r[0])
    assert (await source.get()).authorization == "Bearer access-came-back"


async def test_a_refused_grant_is_not_retried_slowly(
    endpoint: TokenEndpoint, make_source: Callable[..., OAuthSource]
) -> None:
    """A grant the token endpoint refused (an RFC 6749 error) waits for the user: the
    slow retry applies only after transient trouble."""
    endpoint.default = oauth_error(400, "invalid_client", "unknown client")
    source = make_source(endpoint.url, auth_slow_retry=0.05)
    reports = Reports()
    await source.start(reports)
    await reports.wait_for(lambda r: r[3])
    asked = len(endpoint.requests)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(endpoint.next_request(asked + 1), 0.5)


def test_auth_slow_retry_is_validated() -> None:
    """A zero or negative `auth_slow_retry` is refused with a message naming it."""
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="auth-slow-retry"):
            ProxyConfig(target_url=TARGET, auth_slow_retry=bad)
