"""Fault-suite helpers: a misbehaving upstream on the shared `raw_upstream` fixture.

aiohttp's own server is too well-behaved to send garbage or half a body, so the
upstream here reads a request head and then does whatever the test's `Behaviour` says.
A request for `/ok` always gets a proper answer, so the same upstream also proves that
the proxy still serves the next request after a fault.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import pytest

from proxy.forwarding.listener import ForwardingServer

from helpers import ProxyFactory, RawConn, RawServe, RawUpstreamFactory

Behaviour = Callable[[RawConn], Awaitable[None]]


class ProxyTo(Protocol):
    """`proxy_to`: a started proxy in front of a `misbehaving(behaviour)` target."""

    def __call__(self, behaviour: Behaviour, **config: Any) -> Awaitable[ForwardingServer]: ...


def misbehaving(behaviour: Behaviour) -> RawServe:
    """Serve `/ok` properly on each connection until another request comes; that one
    (its head read, its body not) gets `behaviour`, and the connection ends with it."""

    async def serve(conn: RawConn) -> None:
        while True:
            await conn.read_head()
            if conn.path != "/ok":
                await behaviour(conn)
                return
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    return serve


@pytest.fixture
async def proxy_to(raw_upstream: RawUpstreamFactory,
                   make_proxy: ProxyFactory) -> ProxyTo:
    """Start a proxy (`make_proxy` settings) in front of a `misbehaving(behaviour)` target."""

    async def start(behaviour: Behaviour, **config: Any) -> ForwardingServer:
        upstream = await raw_upstream(misbehaving(behaviour))
        return await make_proxy(upstream.url(), **config)

    return start


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Socket-level fault tests run on the stock loop and on uvloop (the CLI's loop when
    installed): transports differ between the two. Process-level ones choose their own."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop}
    if item.path.name not in ("test_upstream_faults.py", "test_backpressure.py"):
        return factories
    try:
        import uvloop
    except ImportError:
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories
