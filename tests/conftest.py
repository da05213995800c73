"""Shared fixtures: real loopback upstreams and a started `ForwardingServer` in front.

Kept generic on purpose: an upstream is any catch-all aiohttp handler, the proxy any
`ProxyConfig`. Everything started here is stopped at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config import ProxyConfig
from proxy.forwarding.listener import ForwardingServer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UpstreamFactory = Callable[..., Awaitable[TestServer]]
ProxyFactory = Callable[..., Awaitable[ForwardingServer]]


@pytest.fixture
async def make_upstream(aiohttp_server: Any) -> UpstreamFactory:
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

    async def factory(target_url: str, *, credentials: Any = None,
                      observers: Iterable[Any] = (), **config: Any) -> ForwardingServer:
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


RawServe = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def raw_target() -> Callable[[RawServe], contextlib.AbstractAsyncContextManager[str]]:
    """A loopback target on raw streams: `async with raw_target(serve) as url`, where
    `serve` runs once per connection (and writes exactly what the test wants)."""

    @contextlib.asynccontextmanager
    async def start(serve: RawServe) -> AsyncIterator[str]:
        tasks: set[asyncio.Task[None]] = set()

        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await serve(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(run, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}/mcp"
        finally:
            server.close()
            for task in tasks:
                task.cancel()
            await server.wait_closed()

    return start
