"""MCP paths: the credential goes only there, and only answers there speak about it.

A local client must not be able to open and close auth episodes at will (each opening
runs `--on-unauthorized-exec`), nor borrow the proxy's credential for the rest of the
target's origin.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy import AuthProxy
from proxy.forwarding.rules import is_mcp_path
from proxy.status.model import WorkloadStatus

from .conftest import CLIENT_SECRET, SECRET, AuthProxyFactory, Recorder, ServeMcp
from .raw import request
from helpers import WAIT

CHALLENGE = 'Bearer error="invalid_token", error_description="expired"'


class Target:
    """An MCP target whose `/mcp` accepts one token and whose `/admin` always says 401."""

    def __init__(self) -> None:
        self.accepted = SECRET
        self.seen: list[tuple[str, str, str | None]] = []  # method, path, Authorization

    async def handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        raw_path = request.raw_path.partition("?")[0]  # as sent: dot segments kept
        self.seen.append((request.method, raw_path, auth))
        if request.path == "/admin":
            return web.Response(status=401, headers={"WWW-Authenticate": CHALLENGE})
        if request.path == "/login":
            return web.Response(text="sign in here")
        if request.path == "/mcp/to-login":
            raise web.HTTPFound("/login")
        if request.path == "/old-mcp":
            raise web.HTTPPermanentRedirect("/mcp")
        if request.method == "OPTIONS":  # a CORS preflight: no credential involved
            return web.Response(status=204, headers={"Access-Control-Allow-Origin": "*"})
        if auth != f"Bearer {self.accepted}":
            return web.Response(status=401, headers={"WWW-Authenticate": CHALLENGE})
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})

    def auth_on(self, path: str) -> list[str | None]:
        return [auth for _, p, auth in self.seen if p == path]


async def settled_status(proxy: AuthProxy) -> WorkloadStatus:
    """The status once every queued write and callback is done."""
    await asyncio.wait_for(proxy.monitor.flush(), WAIT)
    return proxy.status.status


@pytest.fixture
async def target(serve_mcp: ServeMcp) -> tuple[Target, str]:
    target = Target()
    return target, await serve_mcp(target.handle)


async def test_a_flapping_client_cannot_open_episodes_from_an_always_401_path(
    make_authproxy: AuthProxyFactory, target: tuple[Target, str]
) -> None:
    """Twenty round trips alternating an always-401 admin path and the MCP path run the
    unauthorized callback zero times and leave the workload running."""
    _, url = target
    events: list[Any] = []
    proxy = await make_authproxy(url, on_unauthorized=events.append)
    async with aiohttp.ClientSession() as client:
        for _ in range(20):
            async with client.get(proxy.url.replace("/mcp", "/admin")) as resp:
                assert resp.status == 401  # passed on unchanged
                assert resp.headers["WWW-Authenticate"] == CHALLENGE
            async with client.post(proxy.url, json={}) as resp:
                assert resp.status == 200
    assert await settled_status(proxy) == WorkloadStatus.RUNNING
    assert events == []
    assert not proxy.monitor.episode_open


async def test_the_credential_is_injected_on_mcp_paths_only(
    make_authproxy: AuthProxyFactory, target: tuple[Target, str]
) -> None:
    """The target sees the proxy's credential on `/mcp` and below it, and neither that nor
    the client's own `Authorization` anywhere else on its origin."""
    upstream, url = target
    proxy = await make_authproxy(url)
    base = proxy.url.removesuffix("/mcp")
    own = {"Authorization": f"Bearer {CLIENT_SECRET}"}
    async with aiohttp.ClientSession() as client:
        for path in ("/mcp", "/mcp/", "/mcp/x", "/admin", "/login", "/mcpx"):
            async with client.get(base + path, headers=own) as resp:
                await resp.read()
        # A dot segment could take a path below /mcp anywhere on the origin.
        for path in ("/mcp/../admin", "/mcp/%2e%2e/admin"):
            answer = await request(proxy.port, ["Host: 127.0.0.1",
                                                f"Authorization: Bearer {CLIENT_SECRET}"],
                                   target=path)
            assert answer is not None
    injected = f"Bearer {SECRET}"
    assert upstream.auth_on("/mcp") == [injected]
    assert upstream.auth_on("/mcp/") == [injected]
    assert upstream.auth_on("/mcp/x") == [injected]
    for path in ("/admin", "/login", "/mcpx"):
        assert upstream.auth_on(path) == [None], path
    assert all(auth is None for _, p, auth in upstream.seen if ".." in p or "%" in p)


async def test_a_preflight_and_a_redirect_to_a_login_page_prove_nothing(
    make_authproxy: AuthProxyFactory, target: tuple[Target, str]
) -> None:
    """While an episode is open, a preflight's 204 on the MCP path and a followed redirect
    from it to a login page leave the workload unauthenticated; a real 2xx ends it."""
    upstream, url = target
    upstream.accepted = "another-token"  # the proxy's token is revoked
    events: list[Any] = []
    proxy = await make_authproxy(url, on_unauthorized=events.append)
    async with aiohttp.ClientSession() as client:
        async with client.post(proxy.url, json={}) as resp:
            assert resp.status == 503  # the proxy owns the credential (contract)
            assert (await resp.json())["error"] == "upstream_unauthorized"
        assert await settled_status(proxy) == WorkloadStatus.UNAUTHENTICATED
        preflight = {"Origin": "http://localhost:3000",
                     "Access-Control-Request-Method": "POST"}
        async with client.options(proxy.url, headers=preflight) as resp:
            assert resp.status == 204
        async with client.get(proxy.url + "/to-login") as resp:
            assert resp.status == 200
            assert await resp.text() == "sign in here"
        assert await settled_status(proxy) == WorkloadStatus.UNAUTHENTICATED
        assert upstream.auth_on("/login") == [None]  # the followed redirect left MCP paths
        upstream.accepted = SECRET
        async with client.post(proxy.url, json={}) as resp:
            assert resp.status == 200
        assert await settled_status(proxy) == WorkloadStatus.RUNNING
    assert len(events) == 1


async def test_a_redirect_onto_the_mcp_path_gets_the_credential_there_only(
    make_authproxy: AuthProxyFactory, target: tuple[Target, str]
) -> None:
    """A request to an old path that the target redirects to the MCP path goes out
    without the credential, and the followed request to `/mcp` with it."""
    upstream, url = target
    proxy = await make_authproxy(url)
    async with (aiohttp.ClientSession() as client,
                client.post(proxy.url.replace("/mcp", "/old-mcp"), json={}) as resp):
        assert resp.status == 200
    assert upstream.auth_on("/old-mcp") == [None]
    assert upstream.auth_on("/mcp") == [f"Bearer {SECRET}"]


@pytest.mark.parametrize(("method", "target"), [("TRACE", "/mcp"), ("CONNECT", "/mcp"),
                                                 ("CONNECT", "example.com:443")])
async def test_trace_and_connect_get_405_and_never_reach_the_target(
    make_authproxy: AuthProxyFactory, recorder: Recorder, method: str, target: str
) -> None:
    """TRACE would echo the injected credential back to the client and CONNECT would
    open a tunnel: both get 405 with `Allow`, and the target sees nothing."""
    proxy = await make_authproxy(recorder.url)
    answer = await request(proxy.port, ["Host: 127.0.0.1"], method=method, target=target)
    assert answer is not None
    assert answer.status == 405
    assert b"\r\nallow: " in answer.head.lower()
    assert recorder.seen == []


@pytest.mark.parametrize(("path", "mcp"), [
    ("/mcp", True), ("/mcp/", True), ("/mcp/tools", True), ("/mcpx", False),
    ("/", False), ("/admin", False), ("/mcp/../admin", False), ("/mcp/./x", False),
    ("/mcp/%2e%2e/admin", False), ("/mcp/%2E%2e%2Fadmin", False),
    ("/mcp/%252e%252e/admin", False), ("/mcp/..%5cadmin", False),
    ("/messages/", True), ("/messages/x", False), ("/mcp/a.b", True),
])
def test_which_paths_are_mcp_paths(path: str, mcp: bool) -> None:
    """The target path, paths below it and an announced endpoint path are MCP paths;
    sibling paths and paths with dot segments (even encoded) are not."""
    assert is_mcp_path(path, "/mcp", ("/messages/",)) is mcp
