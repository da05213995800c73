"""An https target: verified against the system CAs plus --ca-file, never unverified."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from helpers import ProxyFactory, UpstreamFactory


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


async def whoami(request: web.Request) -> web.Response:
    return web.Response(text=request.headers.get("X-Forwarded-Proto", "-"))


async def test_an_https_target_signed_by_the_ca_file_is_reached(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
    ca: trustme.CA, server_ssl: ssl.SSLContext, tmp_path: Path,
) -> None:
    """A private CA given with --ca-file is trusted; the target learns the client used https."""
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    upstream = await make_upstream(whoami, ssl=server_ssl)
    target = str(upstream.make_url("/mcp"))
    assert target.startswith("https://")
    proxy = await make_proxy(target, ca_file=ca_file)
    async with client.get(proxy.url) as resp:
        assert resp.status == 200
        assert await resp.text() == "https"


async def test_an_https_target_with_an_unknown_ca_is_a_502(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
    server_ssl: ssl.SSLContext,
) -> None:
    """Without the CA the certificate is not trusted: the proxy refuses, it never skips checks."""
    upstream = await make_upstream(whoami, ssl=server_ssl)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with client.get(proxy.url) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"] == "bad_gateway"
