"""A client that stops reading holds the target back: the proxy never buffers a body whole."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiohttp import web

from helpers import WAIT, ProxyFactory, UpstreamFactory

CHUNK = 64 * 1024
TOTAL = 512 * 1024 * 1024  # far more than any buffer on the way should hold
BOUND = 64 * 1024 * 1024  # socket buffers both sides plus the proxy's read-ahead


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_client_that_stops_reading_stalls_the_target_instead_of_filling_memory(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, method: str
) -> None:
    """A slow reader costs the proxy a bounded buffer, not the whole response."""
    sent = 0
    stalled = asyncio.Event()

    async def firehose(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        chunk = b"z" * CHUNK
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while sent < TOTAL:
                try:
                    # Not a timing assertion: a write that cannot finish in a second means
                    # every buffer between here and the idle client is full.
                    await asyncio.wait_for(resp.write(chunk), 1.0)
                except TimeoutError:
                    stalled.set()
                    await asyncio.sleep(3600)
                sent += CHUNK
        return resp

    upstream = await make_upstream(firehose)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        body = b"{}" if method == "POST" else b""
        writer.write(f"{method} /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        # Now read nothing more.
        await asyncio.wait_for(stalled.wait(), 30)
        assert sent < BOUND, f"the proxy buffered {sent >> 20} MiB for an idle client"
    finally:
        writer.close()
