"""Fault-suite fixtures: a misbehaving upstream built on raw asyncio sockets.

aiohttp's own server is too well-behaved to send garbage or half a body, so the
upstream here reads a request head and then does whatever the test's `Behaviour` says.
A request for `/ok` always gets a proper answer, so the same upstream also proves that
the proxy still serves the next request after a fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from helpers import WAIT

Behaviour = Callable[["Conn"], Awaitable[None]]


@dataclass
class Conn:
    """One upstream connection: the request head it got, and its streams."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    head: bytes = b""

    @property
    def path(self) -> str:
        return self.head.split(b" ", 2)[1].decode("latin-1") if self.head else ""

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock: socket.socket = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def wait_closed_by_peer(self) -> None:
        """Return once the proxy's side of this connection is gone (EOF or reset)."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass


@dataclass
class RawUpstream:
    behaviour: Behaviour
    port: int = 0
    conns: list[Conn] = field(default_factory=list)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str = "/mcp") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        conn = Conn(reader, writer)
        try:
            while True:
                try:
                    conn.head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.conns.append(conn)
                self.connected.set()
                if conn.path == "/ok":
                    await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    continue
                await self.behaviour(conn)
                return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.tasks.discard(task)
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Behaviour], Awaitable[RawUpstream]]]:
    servers: list[tuple[asyncio.Server, RawUpstream]] = []

    async def factory(behaviour: Behaviour) -> RawUpstream:
        upstream = RawUpstream(behaviour)
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        upstream.port = server.sockets[0].getsockname()[1]
        servers.append((server, upstream))
        return upstream

    yield factory
    for server, upstream in servers:
        server.close()
        for task in list(upstream.tasks):
            task.cancel()
        if upstream.tasks:
            await asyncio.wait(list(upstream.tasks), timeout=WAIT)
        await server.wait_closed()



def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], Any]]:
    """Socket-level fault tests run on the stock loop and on uvloop (the CLI's loop when
    installed): transports differ between the two. Process-level ones choose their own."""
    factories: dict[str, Callable[[], Any]] = {"asyncio": asyncio.new_event_loop}
    if item.path.name not in ("test_upstream_faults.py", "test_backpressure.py"):
        return factories
    try:
        import uvloop
    except ImportError:
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories
