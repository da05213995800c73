"""Chunked bulk bodies (downloads, not event streams) pushed on as they arrive.

Through the proxy: the body arrives whole, its connection is reused, a body cut short is
an error for the client, and a client that reads nothing stalls the target while the
proxy's buffer stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.wire.server import WRITE_HIGH_WATER as PUSH_HIGH_WATER

from helpers import LONG_WAIT, ProxyFactory, RawConn, RawUpstreamFactory, chunk

BULK_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n")
READ_MAX = 2**18  # the largest single read an event loop hands a protocol (256 KiB)
BOUND = PUSH_HIGH_WATER + 2 * READ_MAX  # the proxy's buffer toward a client that reads nothing

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, pos = [], 0
    for size in sizes:
        if pos >= len(data):
            break
        pieces.append(data[pos:pos + size])
        pos += size
    if pos < len(data):
        pieces.append(data[pos:])
    return pieces


# --- through the proxy -------------------------------------------------------------------

async def read_request(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")  # the tests send GETs: no body


def odd_body(seed: int) -> tuple[bytes, bytes]:
    """A body framed in chunks of odd sizes (some with extensions); (framed, payload)."""
    rng = random.Random(seed)
    payloads = [rng.randbytes(rng.choice((1, 7, 4096, 65536, 100_003))) for _ in range(60)]
    framed = b"".join(
        (b"%x;x=y\r\n%b\r\n" if i % 17 == 5 else b"%x\r\n%b\r\n") % (len(p), p)
        for i, p in enumerate(payloads)
    )
    return framed + b"0\r\n\r\n", b"".join(payloads)


async def test_a_bulk_body_arrives_whole_and_leaves_its_connection_for_the_next_request(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory,
) -> None:
    """Reads cut anywhere (size lines included); every byte arrives; one connection."""
    framed, payload = odd_body(7)

    async def serve(conn: RawConn) -> None:
        reader, writer = conn.reader, conn.writer
        while True:  # keep-alive: one download per request
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            data = BULK_HEAD + framed
            for pos in range(0, len(data), 7001):  # 7001: cuts fall into size lines too
                writer.write(data[pos:pos + 7001])
                await writer.drain()

    upstream = await raw_upstream(serve)
    proxy = await make_proxy(upstream.url())
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(proxy.url) as response:
                assert response.headers["Transfer-Encoding"] == "chunked"
                assert await asyncio.wait_for(response.read(), LONG_WAIT) == payload
    assert upstream.connections == 1


@pytest.mark.parametrize("ending", [b"", b"\r\nzz\r\n"], ids=["target-dies", "broken-framing"])
async def test_a_bulk_body_cut_short_by_the_target_is_an_error_for_the_client(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, ending: bytes
) -> None:
    """A truncated download never looks like a complete one."""
    streaming = asyncio.Event()
    block = b"x" * 65536

    async def serve(conn: RawConn) -> None:
        reader, writer = conn.reader, conn.writer
        await read_request(reader)
        writer.write(BULK_HEAD + chunk(block) * 8 + b"%x\r\n" % len(block) + block[:1000])
        await writer.drain()
        await asyncio.wait_for(streaming.wait(), LONG_WAIT)
        writer.write(block[1000:] + ending if ending else b"")
        await writer.drain()

    upstream = await raw_upstream(serve)
    proxy = await make_proxy(upstream.url())
    async with aiohttp.ClientSession() as session, session.get(proxy.url) as response:
        assert len(await asyncio.wait_for(response.content.readexactly(65536), LONG_WAIT)) \
            == 65536
        streaming.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(response.read(), LONG_WAIT)


async def test_a_client_that_reads_nothing_stalls_the_target_and_bounds_the_proxys_buffer(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory,
) -> None:
    """Bounded memory: while the client reads nothing, the proxy holds at most its high
    water mark plus one read, the target's writes block, and the client hanging up then
    closes the target's connection.

    The target writes without waiting; its own buffer growing past 4 MiB means the
    kernel refuses its bytes: every buffer up to the idle client is full. A proxy
    without flow control would take all 128 MiB.
    """
    total = 128 * 1024 * 1024
    piece = chunk(b"y" * READ_MAX)
    accepted = 0  # bytes the target's kernel took
    peak = 0  # the proxy's largest buffer toward the client, sampled between callbacks
    stalled = asyncio.Event()
    closed = asyncio.Event()
    proxy: Any = None

    def proxy_buffered() -> int:
        sizes = [conn.transport.get_write_buffer_size()
                 for conn in proxy._server.connections if conn.transport is not None]
        return max(sizes, default=0)

    async def serve(conn: RawConn) -> None:
        reader, writer = conn.reader, conn.writer
        nonlocal accepted, peak
        await read_request(reader)
        transport = writer.transport
        writer.write(BULK_HEAD)
        sent = 0
        while sent < total:
            writer.write(piece)
            sent += len(piece)
            await asyncio.sleep(0)  # the proxy's callbacks run between the writes
            peak = max(peak, proxy_buffered())
            if peak > BOUND or transport.get_write_buffer_size() > 4 * 1024 * 1024:
                accepted = sent - transport.get_write_buffer_size()
                stalled.set()
                break
        with contextlib.suppress(ConnectionError):
            await reader.read()  # ends when the proxy closes this connection
        closed.set()

    upstream = await raw_upstream(serve)
    proxy = await make_proxy(upstream.url())
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(client, ("127.0.0.1", proxy.port)), LONG_WAIT)
        await loop.sock_sendall(client, b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await asyncio.wait_for(stalled.wait(), 60)
        assert peak <= BOUND, f"the proxy buffered {peak} bytes"
        assert proxy_buffered() <= BOUND
        assert accepted < 64 * 1024 * 1024, f"{accepted >> 20} MiB left the target"
        head = await asyncio.wait_for(loop.sock_recv(client, 64), LONG_WAIT)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        client.close()
    await asyncio.wait_for(closed.wait(), LONG_WAIT)

