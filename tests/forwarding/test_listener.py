"""The listener's own limits: slow headers, the connection cap, keep-alive and draining."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.config import ProxyConfig
from proxy.forwarding.listener import ForwardingServer, display_host

from helpers import WAIT, ProxyFactory, UpstreamFactory, eventually


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def test_a_client_trickling_its_headers_is_disconnected_after_header_timeout(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """A slowloris client cannot hold a connection open by sending a header now and then."""
    upstream = await make_upstream(hello)
    proxy = await make_proxy(str(upstream.make_url("/mcp")), header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = asyncio.ensure_future(read_until_closed(reader))
        for i in range(100):  # far longer than the timeout, if nothing cut us off
            if closed.done():
                break
            with contextlib.suppress(ConnectionError):
                writer.write(f"X-Slow-{i}: 1\r\n".encode())
                await writer.drain()
            await asyncio.wait([closed], timeout=0.05)
        assert await asyncio.wait_for(closed, WAIT) == b""
    finally:
        writer.close()


async def test_an_idle_kept_alive_connection_is_closed_after_header_timeout(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """After a response, a client that sends nothing more is disconnected."""
    upstream = await make_upstream(hello)
    proxy = await make_proxy(str(upstream.make_url("/mcp")), header_timeout=0.3,
                             keepalive_timeout=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"hello"
        assert await asyncio.wait_for(read_until_closed(reader), WAIT) == b""
    finally:
        writer.close()


async def test_a_slow_target_is_not_cut_off_by_header_timeout(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """header_timeout limits the client's headers, not how long the target may think."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)  # pacing: longer than the header timeout below
        return web.Response(text="late")

    upstream = await make_upstream(slow)
    proxy = await make_proxy(str(upstream.make_url("/mcp")), header_timeout=0.1)
    async with client.get(proxy.url) as resp:
        assert await resp.text() == "late"


async def test_connections_above_the_cap_get_503_and_are_closed(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """An overloaded proxy says so plainly instead of hanging new clients."""
    upstream = await make_upstream(hello)
    proxy = await make_proxy(str(upstream.make_url("/mcp")), max_connections=2)
    held = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(2)]
    request = b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(request)
        answer = await asyncio.wait_for(read_until_closed(reader), WAIT)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503")
        assert b'"service_unavailable"' in answer
        # Freeing one connection makes room again.
        held.pop()[1].close()
        async def served() -> bool:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            writer.close()
            return head.startswith(b"HTTP/1.1 200")

        await eventually(served, what="a connection to be served again")
    finally:
        for _, w in held:
            w.close()


async def test_shutdown_lets_a_request_finish_and_cuts_an_endless_stream(
    make_upstream: UpstreamFactory, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    """Stopping the proxy drains in-flight answers, then ends streams after drain_timeout."""
    finish = asyncio.Event()
    streaming = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/slow":
            await asyncio.wait_for(finish.wait(), WAIT)
            return web.Response(text="done")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": open\n\n")
        streaming.set()
        await asyncio.sleep(3600)
        return resp

    upstream = await make_upstream(handler)
    server = ForwardingServer(ProxyConfig(target_url=str(upstream.make_url("/mcp")),
                                          state_dir=tmp_path))
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    stream = await client.get(base + "/mcp")
    await asyncio.wait_for(streaming.wait(), WAIT)
    slow = asyncio.ensure_future(client.get(base + "/slow"))
    await eventually(lambda: server.in_flight == 2)
    stopping = asyncio.ensure_future(server.shutdown(drain_timeout=0.5))
    finish.set()
    slow_resp = await asyncio.wait_for(slow, WAIT)
    assert await slow_resp.text() == "done"
    await asyncio.wait_for(stopping, WAIT)
    assert server.in_flight == 0
    with contextlib.suppress(aiohttp.ClientError):
        await asyncio.wait_for(stream.content.read(), WAIT)
    stream.close()
    assert server.session.closed


def test_the_client_url_names_a_reachable_address_for_wildcard_binds() -> None:
    """A proxy bound to every interface prints a loopback URL a local client can use."""
    assert display_host("0.0.0.0") == "127.0.0.1"
    assert display_host("::") == "[::1]"
    assert display_host("::1") == "[::1]"
    assert display_host("localhost") == "localhost"
