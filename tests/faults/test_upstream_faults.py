"""A target that misbehaves (garbage, truncation, resets, hangs) gets the client a prompt,
well-formed error or a closed stream, and never stops the proxy serving others."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import pytest

from proxy.forwarding.listener import ForwardingServer

from .conftest import Behaviour, ProxyTo
from helpers import WAIT, RawConn, chunk

SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


async def still_serving(client: aiohttp.ClientSession, proxy: ForwardingServer) -> None:
    async with asyncio.timeout(WAIT):
        async with client.get(f"http://127.0.0.1:{proxy.port}/ok") as resp:
            assert resp.status == 200
            assert await resp.read() == b"ok"


async def proxy_error(client: aiohttp.ClientSession, proxy: ForwardingServer,
                      status: int) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        async with client.get(proxy.url) as resp:
            assert resp.status == status
            assert resp.headers["Content-Type"].startswith("application/json")
            body: dict[str, Any] = await resp.json()
            return body


async def garbage(conn: RawConn) -> None:
    await conn.send(b"SPAM SPAM SPAM\r\n\r\n")


async def close_at_once(conn: RawConn) -> None:
    conn.writer.close()


async def reset_at_once(conn: RawConn) -> None:
    conn.reset()


async def endless_header(conn: RawConn) -> None:
    await conn.send(b"HTTP/1.1 200 OK\r\nX-Endless: ")
    for _ in range(1000):  # up to 64 MiB, far past any header limit; stops when cut off
        await conn.send(b"a" * 65536)


async def too_many_headers(conn: RawConn) -> None:
    await conn.send(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(50000)))


@pytest.mark.parametrize("behaviour", [garbage, close_at_once, reset_at_once, endless_header,
                                       too_many_headers])
async def test_a_target_answering_nonsense_gets_the_client_a_502(
    proxy_to: ProxyTo, client: aiohttp.ClientSession, behaviour: Behaviour
) -> None:
    """Garbage, an empty close, a reset or an endless header become a prompt JSON 502."""
    proxy = await proxy_to(behaviour)
    body = await proxy_error(client, proxy, 502)
    assert body["error"] == "bad_gateway"
    await still_serving(client, proxy)


async def test_a_target_that_never_answers_gets_a_504_after_response_timeout(
    proxy_to: ProxyTo, client: aiohttp.ClientSession
) -> None:
    """A hung target costs the client response_timeout, then a clear 504."""
    release = asyncio.Event()

    async def hang(conn: RawConn) -> None:
        await asyncio.wait_for(release.wait(), 30)

    proxy = await proxy_to(hang, response_timeout=0.3)
    try:
        body = await proxy_error(client, proxy, 504)
        assert body["error"] == "gateway_timeout"
        await still_serving(client, proxy)
    finally:
        release.set()


async def truncated_chunked(conn: RawConn) -> None:
    await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b'{"partial":'))
    await asyncio.sleep(0)  # let the first chunk leave before the close
    conn.writer.close()


async def truncated_length(conn: RawConn) -> None:
    await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n" + b'{"partial":')
    await asyncio.sleep(0)
    conn.writer.close()


async def reset_mid_stream(conn: RawConn) -> None:
    await conn.send(SSE_HEAD + chunk(b"data: one\n\n"))
    await asyncio.sleep(0)
    conn.reset()


async def bad_chunk_size(conn: RawConn) -> None:
    await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + chunk(b"abc") + b"zzzz\r\nnot a chunk\r\n")


@pytest.mark.parametrize("behaviour", [truncated_chunked, truncated_length, reset_mid_stream,
                                       bad_chunk_size])
async def test_a_body_cut_short_by_the_target_ends_the_clients_response_as_an_error(
    proxy_to: ProxyTo, client: aiohttp.ClientSession, behaviour: Behaviour
) -> None:
    """A truncated or reset body is never passed off as a complete one: the client sees an error.
    """
    proxy = await proxy_to(behaviour)
    async with asyncio.timeout(WAIT):
        async with client.get(proxy.url) as resp:
            if resp.status == 502:  # the fault arrived with the head: nothing was sent yet
                assert (await resp.json())["error"] == "bad_gateway"
            else:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
    await still_serving(client, proxy)


async def test_a_stream_hanging_mid_way_stays_open_and_does_not_block_others(
    proxy_to: ProxyTo, client: aiohttp.ClientSession
) -> None:
    """A quiet stream is not cut off (streams have no time limit), and others are still served;
    when the client gives up, the target's connection is released."""
    hanging = asyncio.Event()
    released = asyncio.Event()

    async def hang_mid_stream(conn: RawConn) -> None:
        await conn.send(SSE_HEAD + chunk(b"data: first\n\n"))
        hanging.set()
        await asyncio.wait_for(conn.wait_closed_by_peer(), 30)
        released.set()

    proxy = await proxy_to(hang_mid_stream, response_timeout=0.2)
    async with asyncio.timeout(WAIT):
        resp = await client.get(proxy.url)
        assert await resp.content.readuntil(b"\n\n") == b"data: first\n\n"
        await hanging.wait()
    await still_serving(client, proxy)
    assert not released.is_set()
    resp.close()
    await asyncio.wait_for(released.wait(), WAIT)


async def test_a_client_vanishing_mid_upload_releases_the_upstream_connection(
    proxy_to: ProxyTo, client: aiohttp.ClientSession
) -> None:
    """A client that drops half-way through a POST body does not leave the target waiting."""
    receiving = asyncio.Event()
    released = asyncio.Event()

    async def slow_reader(conn: RawConn) -> None:
        assert await conn.reader.read(1)  # some of the body arrived
        receiving.set()
        await asyncio.wait_for(conn.wait_closed_by_peer(), 30)
        released.set()

    proxy = await proxy_to(slow_reader)
    _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + chunk(b"x" * 1000))
    await writer.drain()
    await asyncio.wait_for(receiving.wait(), WAIT)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    await asyncio.wait_for(released.wait(), WAIT)
    forwarder = proxy._forwarder
    assert forwarder is not None  # started
    assert await forwarder.wait_idle(WAIT)
    await still_serving(client, proxy)


async def test_a_client_vanishing_mid_stream_releases_the_upstream_connection(
    proxy_to: ProxyTo
) -> None:
    """Closing an SSE stream on the client side closes it on the target's side too."""
    released = asyncio.Event()

    async def stream(conn: RawConn) -> None:
        await conn.send(SSE_HEAD + chunk(b"data: hello\n\n"))
        await asyncio.wait_for(conn.wait_closed_by_peer(), 30)
        released.set()

    proxy = await proxy_to(stream)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"data: hello\n\n"), WAIT)
    writer.close()
    await asyncio.wait_for(released.wait(), WAIT)
    forwarder = proxy._forwarder
    assert forwarder is not None  # started
    assert await forwarder.wait_idle(WAIT)
