"""Credential injection on the forwarding path, with small in-test credential sources."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web
from structlog.testing import capture_logs

from proxy.credentials.base import Credential, CredentialReporter
from proxy.errors import CredentialRetrying
from proxy.forwarding.observe import Exchange

from helpers import WAIT, ProxyFactory, UpstreamFactory


class StaticBearer:
    """A fixed token, like a token file that never changes."""

    description = "test token"
    fix = "replace the test token"
    can_refresh = False

    def __init__(self, token: str = "tok-1") -> None:
        self.credential = Credential(f"Bearer {token}", 1)
        self.unauthorized: list[int] = []

    @property
    def current_version(self) -> int | None:
        return self.credential.version

    async def start(self, report: CredentialReporter) -> None:
        return None

    async def close(self) -> None:
        return None

    def ready(self) -> Credential | None:
        return None  # always through get(): the awaited path stays covered

    async def get(self) -> Credential:
        return self.credential

    async def after_unauthorized(self, used: Credential) -> Credential | None:
        self.unauthorized.append(used.version)
        return None


class RefreshingBearer(StaticBearer):
    """Like OAuth: a 401 is answered with a fresh token (tok-2, tok-3, ...)."""

    can_refresh = True

    async def after_unauthorized(self, used: Credential) -> Credential | None:
        self.unauthorized.append(used.version)
        version = self.credential.version + 1
        self.credential = Credential(f"Bearer tok-{version}", version)
        return self.credential


class Unavailable(StaticBearer):
    async def get(self) -> Credential:
        raise CredentialRetrying("TokenRefreshRetrying", "token refresh keeps failing", 2.5)


class Credentials:
    """Remembers the credential version of each final upstream request."""

    def __init__(self) -> None:
        self.versions: list[int | None] = []

    def on_response(self, exchange: Exchange) -> None:
        self.versions.append(exchange.credential.version if exchange.credential else None)

    def on_complete(self, exchange: Exchange, duration: float, bytes_out: int) -> None:
        return None


def guarded(valid: str, seen: list[tuple[str | None, bytes]]) -> Any:
    """An upstream that wants `Authorization: <valid>` and records what it got."""

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.headers.get("Authorization"), body))
        if request.headers.get("Authorization") != valid:
            return web.Response(status=401, headers={
                "WWW-Authenticate": 'Bearer error="invalid_token"'})
        return web.Response(text="ok:" + body.decode())

    return handler


async def test_the_configured_credential_replaces_the_clients_authorization(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The target sees the proxy's token, never the one the client sent (no passthrough)."""
    seen: list[tuple[str | None, bytes]] = []
    upstream = await make_upstream(guarded("Bearer tok-1", seen))
    proxy = await make_proxy(str(upstream.make_url("/mcp")), credentials=StaticBearer())
    with capture_logs() as logs:
        async with client.post(proxy.url, data=b"{}",
                               headers={"Authorization": "Bearer client-own"}) as resp:
            assert await resp.text() == "ok:{}"
    assert seen == [("Bearer tok-1", b"{}")]
    assert "tok-1" not in json.dumps(logs, default=str)


async def test_without_a_source_the_clients_authorization_is_forwarded(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """With no credential configured the client authenticates itself through the proxy."""
    seen: list[tuple[str | None, bytes]] = []
    upstream = await make_upstream(guarded("Bearer client-own", seen))
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with client.get(proxy.url, headers={"Authorization": "Bearer client-own"}) as resp:
        assert resp.status == 200
    assert seen == [("Bearer client-own", b"")]


async def test_no_credential_at_hand_is_a_503_with_retry_after_never_a_401(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Clients are told to retry later instead of starting their own OAuth discovery."""
    seen: list[tuple[str | None, bytes]] = []
    upstream = await make_upstream(guarded("Bearer tok-1", seen))
    proxy = await make_proxy(str(upstream.make_url("/mcp")), credentials=Unavailable())
    async with client.post(proxy.url, data=b"{}") as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "3"
        body = await resp.json()
    assert body["error"] == "credential_unavailable"
    assert body["reason"] == "TokenRefreshRetrying"
    assert seen == []


async def test_a_401_with_a_static_token_becomes_a_503_naming_the_fix(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The proxy owns the credential: the client gets 503 upstream_unauthorized with
    Retry-After and the fix, never the target's challenge; the source is told once."""
    seen: list[tuple[str | None, bytes]] = []
    upstream = await make_upstream(guarded("Bearer other", seen))
    source = StaticBearer()
    proxy = await make_proxy(str(upstream.make_url("/mcp")), credentials=source)
    async with client.post(proxy.url, data=b"{}") as resp:
        assert resp.status == 503
        assert "WWW-Authenticate" not in resp.headers
        assert int(resp.headers["Retry-After"]) >= 1
        body = await resp.json()
    assert body["error"] == "upstream_unauthorized"
    assert "invalid_token" in body["message"]
    assert "replace the test token" in body["message"]
    assert len(seen) == 1
    assert source.unauthorized == [1]


async def test_pass_401_passes_the_targets_401_unchanged(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """With pass_401 the client gets the target's own 401 and challenge."""
    seen: list[tuple[str | None, bytes]] = []
    upstream = await make_upstream(guarded("Bearer other", seen))
    proxy = await make_proxy(str(upstream.make_url("/mcp")), credentials=StaticBearer(),
                             pass_401=True)
    async with client.post(proxy.url, data=b"{}") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


async def test_a_403_insufficient_scope_becomes_json_naming_the_scope(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The client learns which scope is missing, without a challenge that would send a
    TypeScript-SDK client to the target's authorization server for a step-up."""

    async def forbidden(request: web.Request) -> web.Response:
        return web.Response(status=403, headers={
            "WWW-Authenticate": 'Bearer error="insufficient_scope", scope="tools:write"'})

    upstream = await make_upstream(forbidden)
    proxy = await make_proxy(str(upstream.make_url("/mcp")), credentials=StaticBearer())
    async with client.post(proxy.url, data=b"{}") as resp:
        assert resp.status == 403
        assert "WWW-Authenticate" not in resp.headers
        body = await resp.json()
    assert body["error"] == "insufficient_scope"
    assert body["scope"] == "tools:write"
    assert "tools:write" in body["message"]


async def test_a_401_off_the_mcp_path_passes_unchanged(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Only the MCP path's 401 speaks about the proxy's credential."""
    seen: list[tuple[str | None, bytes]] = []
    upstream = await make_upstream(guarded("Bearer other", seen))
    proxy = await make_proxy(str(upstream.make_url("/mcp")), credentials=StaticBearer())
    async with client.post(proxy.url.replace("/mcp", "/admin"), data=b"{}") as resp:
        assert resp.status == 401


async def test_a_refreshing_source_gets_one_refresh_and_one_replay_with_the_same_body(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """An expired OAuth token costs the client nothing: it just gets its answer."""
    seen: list[tuple[str | None, bytes]] = []
    upstream = await make_upstream(guarded("Bearer tok-2", seen))
    record = Credentials()
    proxy = await make_proxy(str(upstream.make_url("/mcp")), credentials=RefreshingBearer(),
                             observers=[record])
    async with client.post(proxy.url, data=b'{"id": 7}') as resp:
        assert resp.status == 200
        assert await resp.text() == 'ok:{"id": 7}'
    assert seen == [("Bearer tok-1", b'{"id": 7}'), ("Bearer tok-2", b'{"id": 7}')]
    assert record.versions == [2]


async def test_a_replayed_chunked_body_is_sent_whole_the_second_time(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A streamed upload small enough to keep is replayed exactly after a refresh."""
    seen: list[tuple[str | None, bytes]] = []
    upstream = await make_upstream(guarded("Bearer tok-2", seen))
    proxy = await make_proxy(str(upstream.make_url("/mcp")), credentials=RefreshingBearer())

    async def body() -> Any:
        for part in (b"a" * 10, b"b" * 10, b"c" * 10):
            yield part

    async with client.post(proxy.url, data=body()) as resp:
        assert resp.status == 200
    assert [s[1] for s in seen] == [b"a" * 10 + b"b" * 10 + b"c" * 10] * 2


async def test_a_body_over_the_replay_limit_is_not_replayed(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A large upload is sent once; its 401 reaches the client as the proxy's 503."""
    seen: list[tuple[str | None, bytes]] = []
    upstream = await make_upstream(guarded("Bearer tok-2", seen))
    record = Credentials()
    proxy = await make_proxy(str(upstream.make_url("/mcp")), credentials=RefreshingBearer(),
                             replay_limit=64, observers=[record])
    async with client.post(proxy.url, data=b"z" * 100) as resp:
        assert resp.status == 503
    assert len(seen) == 1
    assert record.versions == [1]


async def test_a_redirect_elsewhere_never_carries_the_credential(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A target redirecting to another origin gets the redirect to the client, no token."""
    other_seen: list[str | None] = []

    async def other(request: web.Request) -> web.Response:
        other_seen.append(request.headers.get("Authorization"))
        return web.Response(text="other")

    elsewhere = await make_upstream(other)
    same_origin_auth: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        if request.path == "/mcp":
            return web.Response(status=302, headers={"Location": "/mcp/moved"})
        if request.path == "/mcp/moved":
            same_origin_auth.append(request.headers.get("Authorization"))
            return web.Response(status=307, headers={"Location": str(elsewhere.make_url("/x"))})
        return web.Response(status=404)

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")), credentials=StaticBearer())
    async with client.get(proxy.url, allow_redirects=False) as resp:
        assert resp.status == 307
        assert resp.headers["Location"] == str(elsewhere.make_url("/x"))
    assert same_origin_auth == ["Bearer tok-1"]  # followed on the target's own MCP path
    assert other_seen == []
    async with client.get(resp.headers["Location"]) as resp2:
        assert await resp2.text() == "other"
    assert other_seen == [None]


async def test_a_redirect_of_a_body_too_large_to_keep_goes_to_the_client(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A 307 the proxy cannot honour (body not kept) is the client's to follow."""
    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        hits.append(request.path)
        return web.Response(status=307, headers={"Location": "/mcp/"})

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")), replay_limit=10)
    async with client.post(proxy.url, data=b"q" * 50, allow_redirects=False) as resp:
        assert resp.status == 307
    assert hits == ["/mcp"]


async def test_a_401_before_the_body_is_sent_still_replays_the_whole_body(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A target that refuses at once, mid-upload, still gets the full body on the replay."""
    refreshed = asyncio.Event()
    seen: list[tuple[str | None, bytes]] = []

    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer tok-2":
            seen.append((request.headers.get("Authorization"), b""))
            return web.Response(status=401)  # without reading the body
        body = await request.read()
        seen.append((request.headers.get("Authorization"), body))
        return web.Response(text="ok")

    class Signalling(RefreshingBearer):
        async def after_unauthorized(self, used: Credential) -> Credential | None:
            fresh = await super().after_unauthorized(used)
            refreshed.set()
            return fresh

    async def body() -> Any:
        yield b"first;"
        await asyncio.wait_for(refreshed.wait(), WAIT)
        yield b"second"

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")), credentials=Signalling())
    async with client.post(proxy.url, data=body()) as resp:
        assert resp.status == 200
    assert seen == [("Bearer tok-1", b""), ("Bearer tok-2", b"first;second")]
