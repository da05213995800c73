"""Shared fixtures: real loopback upstreams and a started `ForwardingServer` in front.

Kept generic on purpose: an upstream is any catch-all aiohttp handler, the proxy any
`ProxyConfig`. Everything started here is stopped at teardown.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from proxy.config import ProxyConfig
from proxy.credentials.base import CredentialSource
from proxy.forwarding.listener import ForwardingServer
from proxy.forwarding.observe import ForwardObserver

from helpers import (
    WAIT,
    Handler,
    ProxyFactory,
    RawServe,
    RawUpstream,
    RawUpstreamFactory,
    UpstreamFactory,
)


@pytest.fixture
async def make_upstream(aiohttp_server: AiohttpServer) -> UpstreamFactory:
    """Start a loopback upstream answering every method and path with `handler`."""

    async def factory(handler: Handler, **server_kwargs: Any) -> TestServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server: TestServer = await aiohttp_server(app, host="127.0.0.1", **server_kwargs)
        return server

    return factory


@pytest.fixture
async def make_proxy(tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    """Start a `ForwardingServer` for a target URL; shortened tunables can be passed."""
    started: list[ForwardingServer] = []

    async def factory(target_url: str, *, credentials: CredentialSource | None = None,
                      observers: Iterable[ForwardObserver] = (),
                      **config: Any) -> ForwardingServer:
        config.setdefault("state_dir", tmp_path / "state")
        server = ForwardingServer(
            ProxyConfig(target_url=target_url, **config),
            credentials=credentials, observers=list(observers),
        )
        await server.start()
        started.append(server)
        return server

    yield factory
    for server in started:
        await server.shutdown(drain_timeout=0.5)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client that adds no headers the proxy would then have to account for."""
    async with aiohttp.ClientSession(
        auto_decompress=False,
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
    ) as session:
        yield session


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstreamFactory]:
    """Start a `RawUpstream`: `upstream = await raw_upstream(serve)`, then `upstream.url()`.
    Stopped at teardown, its connections cancelled."""
    started: list[tuple[asyncio.Server, RawUpstream]] = []

    async def factory(serve: RawServe) -> RawUpstream:
        upstream = RawUpstream(serve)
        server = await asyncio.start_server(upstream.run, "127.0.0.1", 0)
        upstream.port = server.sockets[0].getsockname()[1]
        started.append((server, upstream))
        return upstream

    yield factory
    for server, upstream in started:
        server.close()
        for task in list(upstream.tasks):
            task.cancel()
        if upstream.tasks:
            await asyncio.wait(list(upstream.tasks), timeout=WAIT)
        await asyncio.wait_for(server.wait_closed(), WAIT)
