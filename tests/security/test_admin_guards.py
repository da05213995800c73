"""The admin port answers only loopback Hosts and allowed Origins, like the proxy port."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from .conftest import AuthProxyFactory
from helpers import UpstreamFactory


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
    make_upstream: UpstreamFactory, make_authproxy: AuthProxyFactory, headers: dict[str, str],
    status: int
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


async def test_allowed_host_turns_the_host_guard_on_for_a_wildcard_bind(
    make_upstream: UpstreamFactory, make_authproxy: AuthProxyFactory
) -> None:
    """Bound to 0.0.0.0 with `--allowed-host svc`, a rebound host name gets 421 on the
    proxy port and on the admin port, while `svc` and loopback names pass."""

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({})

    upstream = await make_upstream(ok)
    proxy = await make_authproxy(str(upstream.make_url("/mcp")), host="0.0.0.0",
                                 allowed_hosts=("svc",), admin_port=0)
    async with aiohttp.ClientSession() as session:
        for url in (f"http://127.0.0.1:{proxy.port}/mcp",
                    f"http://127.0.0.1:{proxy.admin_port}/status"):
            for host, status in (("svc", 200), (f"svc:{proxy.port}", 200),
                                 ("localhost", 200), ("attacker.example", 421),
                                 ("attacker.example:80", 421)):
                async with session.get(url, headers={"Host": host}) as resp:
                    assert resp.status == status, (url, host)


async def test_the_admin_port_binds_loopback_even_when_the_proxy_binds_everything(
    make_upstream: UpstreamFactory, make_authproxy: AuthProxyFactory
) -> None:
    """With `--host 0.0.0.0` the proxy answers on every address but `/status` and
    `/metrics` only on 127.0.0.1, unless `--admin-host` says otherwise."""

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({})

    upstream = await make_upstream(ok)
    target = str(upstream.make_url("/mcp"))
    # 127.0.0.2 is another loopback address: a wildcard bind answers it, 127.0.0.1 does not.
    default = await make_authproxy(target, host="0.0.0.0", admin_port=0, name="default")
    wide = await make_authproxy(target, host="0.0.0.0", admin_port=0, name="wide",
                                admin_host="0.0.0.0")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.2:{default.port}/mcp") as resp:
            assert resp.status == 200
        async with session.get(f"http://127.0.0.1:{default.admin_port}/healthz") as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectorError):
            async with session.get(f"http://127.0.0.2:{default.admin_port}/status"):
                pass
        async with session.get(f"http://127.0.0.2:{wide.admin_port}/status") as resp:
            assert resp.status == 200


def test_admin_host_is_a_run_flag() -> None:
    """`run --admin-host` reaches the configuration (default 127.0.0.1); an empty one is
    refused with a message naming the flag."""
    from proxy.cli.main import build_parser, config_from_args
    from proxy.config import ProxyConfig

    run = ["run", "--target-url", "http://127.0.0.1:9/mcp"]
    assert config_from_args(build_parser().parse_args(run), env={}).admin_host == "127.0.0.1"
    wide = build_parser().parse_args([*run, "--admin-host", "0.0.0.0"])
    assert config_from_args(wide, env={}).admin_host == "0.0.0.0"
    with pytest.raises(ValueError, match="--admin-host"):
        ProxyConfig(target_url="http://127.0.0.1:9/mcp", admin_host="")
