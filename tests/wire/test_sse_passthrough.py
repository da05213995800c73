"""Chunked event streams pushed on event by event, through the proxy."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from helpers import WAIT, ProxyFactory, RawConn, RawServe, RawUpstreamFactory, chunk

SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# --- through the proxy ------------------------------------------------------------------

def reading_the_request(script: Script) -> RawServe:
    """`script`, run once the request (head and any Content-Length body) was read."""

    async def serve(conn: RawConn) -> None:
        await conn.read_request()
        await script(conn.reader, conn.writer)

    return serve


async def test_each_event_reaches_the_client_before_the_next_is_sent(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """Events are not held back: the target sends the next only once the client has this one."""
    got = asyncio.Queue[bytes]()
    events = [b"data: %d\n\n" % i for i in range(20)]

    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD)
        for event in events:
            writer.write(chunk(event))
            await writer.drain()
            assert await asyncio.wait_for(got.get(), WAIT) == event
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    upstream = await raw_upstream(reading_the_request(script))
    proxy = await make_proxy(upstream.url())
    async with aiohttp.ClientSession() as session, \
            session.post(proxy.url, data=b"{}") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        body = b""
        for event in events:
            while not body.endswith(event):
                body += await asyncio.wait_for(response.content.readany(), WAIT)
            got.put_nowait(event)
        assert await asyncio.wait_for(response.content.read(), WAIT) == b""
        assert body == b"".join(events)


async def test_odd_framing_reaches_the_client_as_the_same_events(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """Split chunks, chunk extensions and trailers from the target still give clean events."""
    framed = (chunk(b"data: first\n\n") + b"e;ext=1\r\ndata: second\n\n\r\n"
              + chunk(b"data: third\n\n") + b"0\r\nX-Trailer: t\r\n\r\n")

    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + framed[:5])
        await writer.drain()
        for i in range(5, len(framed), 7):
            writer.write(framed[i:i + 7])
            await writer.drain()
            await asyncio.sleep(0)  # let the pieces arrive one by one

    upstream = await raw_upstream(reading_the_request(script))
    proxy = await make_proxy(upstream.url())
    async with aiohttp.ClientSession() as session, \
            session.post(proxy.url, data=b"{}") as response:
        body = await asyncio.wait_for(response.read(), WAIT)
    assert body == b"data: first\n\ndata: second\n\ndata: third\n\n"


@pytest.mark.parametrize("ending", [b"", b"zz\r\n"], ids=["target-dies", "broken-framing"])
async def test_a_stream_cut_short_by_the_target_is_an_error_for_the_client(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, ending: bytes
) -> None:
    """A client never mistakes a target that died mid-stream for a clean end."""
    streaming = asyncio.Event()

    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + chunk(b"data: 1\n\n"))
        await writer.drain()
        await asyncio.wait_for(streaming.wait(), WAIT)
        writer.write(ending)
        await writer.drain()

    upstream = await raw_upstream(reading_the_request(script))
    proxy = await make_proxy(upstream.url())
    async with aiohttp.ClientSession() as session, \
            session.post(proxy.url, data=b"{}") as response:
        assert await asyncio.wait_for(response.content.readuntil(b"\n\n"), WAIT) \
            == b"data: 1\n\n"
        streaming.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(response.read(), WAIT)


async def test_a_client_hanging_up_closes_the_targets_stream(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """An abandoned stream does not keep the target's connection open."""
    closed = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + chunk(b"data: hello\n\n"))
        await writer.drain()
        await reader.read()  # the proxy's side closing ends this
        closed.set()

    upstream = await raw_upstream(reading_the_request(script))
    proxy = await make_proxy(upstream.url())
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url, data=b"{}") as response:
            await asyncio.wait_for(response.content.readuntil(b"\n\n"), WAIT)
        await asyncio.wait_for(closed.wait(), WAIT)


async def test_a_client_that_stops_reading_stalls_an_event_stream(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """A slow SSE reader costs the proxy a bounded buffer, not the whole stream."""
    sent = 0
    stalled = asyncio.Event()
    event = chunk(b"data: " + b"x" * 4000 + b"\n\n")

    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        writer.write(SSE_HEAD)
        while sent < 512 * 1024 * 1024:
            writer.write(event)
            try:
                # Not a timing assertion: a drain that cannot finish in a second means
                # every buffer between here and the idle client is full.
                await asyncio.wait_for(writer.drain(), 1.0)
            except TimeoutError:
                stalled.set()
                await asyncio.sleep(3600)
            sent += len(event)

    upstream = await raw_upstream(reading_the_request(script))
    proxy = await make_proxy(upstream.url())
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        await asyncio.wait_for(stalled.wait(), 30)
        assert sent < 64 * 1024 * 1024, f"the proxy buffered {sent >> 20} MiB"
    finally:
        writer.close()


async def test_an_ended_event_stream_leaves_its_connection_for_the_next_call(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory,
) -> None:
    """A tool call answered as a stream does not cost the next call a new connection."""
    first_seen = asyncio.Queue[None]()

    async def serve(conn: RawConn) -> None:
        while True:  # keep-alive: one event stream per request
            await conn.read_request()
            await conn.send(SSE_HEAD + chunk(b"data: 1\n\n"))
            await asyncio.wait_for(first_seen.get(), WAIT)  # the rest comes streamed
            await conn.send(chunk(b"data: 2\n\n") + b"0\r\n\r\n")

    upstream = await raw_upstream(serve)
    proxy = await make_proxy(upstream.url())
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(proxy.url, data=b"{}") as response:
                first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), WAIT)
                first_seen.put_nowait(None)
                rest = await asyncio.wait_for(response.read(), WAIT)
                assert first + rest == b"data: 1\n\ndata: 2\n\n"
    assert upstream.connections == 1


async def test_a_stream_whose_first_events_came_with_its_head_is_carried_on_whole(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """Head and first events in one read are sent from the socket callback; the rest of
    the stream follows them in order, byte for byte, and the clean end leaves the target
    connection reusable (the hand-over to the passthrough took the events sent early
    into account)."""
    first = [b"data: early-%d\n\n" % i for i in range(3)]
    later = [b"data: later-%d\n\n" % i for i in range(5)]
    release = asyncio.Event()

    async def serve(conn: RawConn) -> None:
        while True:
            await conn.read_request()  # the first call, then the next on this connection
            await conn.send(SSE_HEAD + b"".join(chunk(event) for event in first))
            await asyncio.wait_for(release.wait(), WAIT)
            for event in later:
                await conn.send(chunk(event))
            await conn.send(b"0\r\n\r\n")
            release.clear()

    upstream = await raw_upstream(serve)
    proxy = await make_proxy(upstream.url())
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(proxy.url, data=b"{}") as response:
                body = b""
                while not body.endswith(first[-1]):
                    body += await asyncio.wait_for(response.content.readany(), WAIT)
                assert body == b"".join(first)  # before the target sent anything more
                release.set()
                body += await asyncio.wait_for(response.content.read(), WAIT)
                assert body == b"".join(first + later)
    assert upstream.connections == 1
