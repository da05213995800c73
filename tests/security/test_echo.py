"""A target that echoes the credential back (in its 401 challenge) cannot get it into output."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from proxy.log import REDACTED, mask_known_secrets, register_secret

from .conftest import SECRET, AuthProxyFactory, LeakWatch
from .raw import request
from helpers import UpstreamFactory


async def test_a_target_echoing_the_token_in_its_challenge_does_not_leak_it(
    make_upstream: UpstreamFactory, make_authproxy: AuthProxyFactory, leak_watch: LeakWatch
) -> None:
    """Even a careless target quoting the token in error_description leaves no trace of it."""

    async def echo(request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        challenge = (f'Bearer error="invalid_token", '
                     f'error_description="the token {token} has expired"')
        return web.Response(status=401, headers={"WWW-Authenticate": challenge})

    upstream = await make_upstream(echo)
    events: list[Any] = []
    proxy = await make_authproxy(str(upstream.make_url("/mcp")), admin_port=0,
                                 on_unauthorized=events.append)
    answer = await request(proxy.port, ["Host: 127.0.0.1"])
    assert answer is not None and answer.status == 503  # upstream_unauthorized, no challenge
    await proxy.monitor.flush()
    assert proxy.status.status == "unauthenticated"
    assert SECRET not in proxy.status.message
    assert REDACTED in proxy.status.message
    async with (aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{proxy.admin_port}/status") as resp):
        leak_watch.texts.append(await resp.text())
    leak_watch.texts.append(str(proxy.status.to_dict()))
    assert len(events) == 1  # the callback's event (and MCP_AUTHPROXY_EVENT) is masked too
    leak_watch.texts.append(repr(events[0]))
    assert SECRET not in repr(events[0]) and REDACTED in (events[0].www_authenticate or "")
    assert any(e.get("event") == "unauthorized" for e in leak_watch.logs)


def test_only_credential_sized_values_are_masked() -> None:
    """Registering a credential masks it everywhere, but short values never mask plain words."""
    register_secret("  zq-registered-credential-42 \n")
    register_secret("short")
    assert mask_known_secrets("a zq-registered-credential-42 b") == f"a {REDACTED} b"
    assert mask_known_secrets("a short word") == "a short word"
