"""The admin port answers only loopback Hosts and allowed Origins, like the proxy port."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 200),
        ({"Origin": "http://localhost:3000"}, 200),
        ({"Host": "attacker.example"}, 421),
        ({"Host": "attacker.example:8080"}, 421),
        ({"Origin": "https://evil.example"}, 403),
        ({"Origin": "null"}, 403),
        ({"Origin": "http://localhost.evil.example"}, 403),
    ],
)
async def test_a_rebound_page_cannot_read_the_admin_port(
    make_upstream: Any, make_authproxy: Any, headers: dict[str, str], status: int
) -> None:
    """A web page that rebinds its host name to 127.0.0.1, or posts from a foreign origin,
    cannot read /status or /metrics from the admin port."""

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({})

    upstream = await make_upstream(ok)
    proxy = await make_authproxy(str(upstream.make_url("/mcp")), admin_port=0)
    async with aiohttp.ClientSession() as session:
        for path in ("/status", "/metrics"):
            url = f"http://127.0.0.1:{proxy.admin_port}{path}"
            async with session.get(url, headers=headers) as resp:
                assert resp.status == status, path
