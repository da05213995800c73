"""The client-facing HTTP/1.1 server (`proxy.wire.server`), spoken to over raw sockets.

What aiohttp's server used to decide for the proxy, the lean protocol decides now:
framing for HTTP/1.0 and HTTP/1.1 clients, HEAD, pipelining order, keep-alive, and
which headers it adds (a Date, nothing else).
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from helpers import LONG_WAIT, WAIT, ProxyFactory, RawConn, RawUpstreamFactory, UpstreamFactory


async def _exchange(port: int, raw: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    return reader, writer


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), LONG_WAIT)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _streaming(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()  # no length: chunked to the proxy
    await response.prepare(request)
    for part in (b"one-", b"two-", b"three"):
        await response.write(part)
    await response.write_eof()
    return response


async def test_http10_client_gets_the_streamed_body_unframed_then_close(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory
) -> None:
    upstream = await make_upstream(_streaming)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    reader, writer = await _exchange(
        proxy.port, b"GET /mcp HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        status, headers = await _read_head(reader)
        assert status.startswith("HTTP/1.0 200")
        assert "transfer-encoding" not in headers and headers["connection"] == "close"
        # An HTTP/1.0 client reads to the end of the connection: it must end.
        assert await asyncio.wait_for(reader.read(), LONG_WAIT) == b"one-two-three"
    finally:
        writer.close()


async def test_http10_keep_alive_is_honoured_when_the_length_is_known(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory
) -> None:
    async def fixed(request: web.Request) -> web.Response:
        return web.Response(body=b"fixed:" + request.path.encode())

    upstream = await make_upstream(fixed)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    ask = b"GET /mcp HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n"
    reader, writer = await _exchange(proxy.port, ask)
    try:
        for _ in range(2):
            status, headers = await _read_head(reader)
            assert status.startswith("HTTP/1.0 200") and headers["connection"] == "keep-alive"
            body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])),
                                          LONG_WAIT)
            assert body == b"fixed:/mcp"
            writer.write(ask)
    finally:
        writer.close()


async def test_head_answer_has_no_body_and_the_connection_stays_usable(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b"12345", content_type="text/plain")

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    reader, writer = await _exchange(
        proxy.port,
        b"HEAD /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        status, headers = await _read_head(reader)
        assert status.startswith("HTTP/1.1 200") and headers["content-length"] == "5"
        # No body after the HEAD answer: the next bytes are the GET's status line.
        status, headers = await _read_head(reader)
        assert status.startswith("HTTP/1.1 200")
        assert await asyncio.wait_for(reader.readexactly(5), LONG_WAIT) == b"12345"
    finally:
        writer.close()


async def test_pipelined_requests_are_answered_in_order(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory
) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.query["n"])
        if request.query["n"] == "0":
            await asyncio.sleep(0.05)  # the slowest answer first: order must not change
        return web.Response(body=f"answer-{request.query['n']}".encode())

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    raw = b"".join(b"GET /mcp?n=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % i for i in range(3))
    reader, writer = await _exchange(proxy.port, raw)
    try:
        bodies = []
        for _ in range(3):
            _, headers = await _read_head(reader)
            bodies.append(await asyncio.wait_for(
                reader.readexactly(int(headers["content-length"])), LONG_WAIT))
        assert bodies == [b"answer-0", b"answer-1", b"answer-2"]
    finally:
        writer.close()
    assert seen == ["0", "1", "2"]


async def test_only_a_date_is_added_to_the_targets_headers(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """A bare answer reaches the client with a Date added and no header of the proxy's own."""

    async def bare(conn: RawConn) -> None:
        await conn.read_head()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    proxy = await make_proxy((await raw_upstream(bare)).url())
    reader, writer = await _exchange(
        proxy.port, b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    try:
        status, headers = await _read_head(reader)
        assert status == "HTTP/1.1 200 OK"
        # No Content-Type or Server of the proxy's own: only a Date, and the close.
        assert set(headers) == {"content-length", "date", "connection"}
        assert await asyncio.wait_for(reader.read(), LONG_WAIT) == b"{}"
    finally:
        writer.close()


async def test_request_after_a_malformed_one_is_not_served(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory
) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.path_qs)
        return web.Response(body=b"ok")

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    reader, writer = await _exchange(
        proxy.port, b"GET /mcp?n=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        first, headers = await _read_head(reader)
        assert first.startswith("HTTP/1.1 200")
        await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), LONG_WAIT)
        writer.write(b"GET /mcp?n=2 HTTP/1.1\r\nBad Header Line\r\n\r\n"
                     b"GET /mcp?n=3 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        second, headers = await _read_head(reader)
        assert second.startswith("HTTP/1.1 400") and headers["connection"] == "close"
        rest = await asyncio.wait_for(reader.read(), LONG_WAIT)
        assert b"bad_request" in rest and b"Bad Header" not in rest
    finally:
        writer.close()
    assert seen == ["/mcp?n=1"]


async def test_a_flood_of_pipelined_requests_is_served_in_order(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """More pipelined requests than the parse-ahead queue holds: reading pauses, resumes,
    and every request is answered once, in order."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=f"n={request.query['n']}".encode())

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    count = 200
    raw = b"".join(b"GET /mcp?n=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % i
                   for i in range(count))
    reader, writer = await _exchange(proxy.port, raw)
    try:
        for i in range(count):
            _, headers = await _read_head(reader)
            body = await asyncio.wait_for(
                reader.readexactly(int(headers["content-length"])), LONG_WAIT)
            assert body == f"n={i}".encode()
    finally:
        writer.close()


async def test_a_failing_handler_gets_a_json_500_and_the_connection_closes(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the handler: the client gets a short JSON 500 (no traceback, nothing of
    the request), the connection closes, and the proxy keeps serving others."""
    from proxy.forwarding.handler import Forwarder
    from proxy.wire.reply import Reply
    from proxy.wire.server import InboundRequest

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b"ok")

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    real = Forwarder.__call__
    calls = 0

    async def broken_once(self: Forwarder, request: InboundRequest) -> Reply:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug with Bearer secret-in-message")
        return await real(self, request)

    monkeypatch.setattr(Forwarder, "__call__", broken_once)
    reader, writer = await _exchange(
        proxy.port, b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer abc\r\n\r\n")
    try:
        status, headers = await _read_head(reader)
        assert status.startswith("HTTP/1.1 500") and headers["connection"] == "close"
        rest = await asyncio.wait_for(reader.read(), LONG_WAIT)
        assert b"internal_error" in rest and b"secret" not in rest and b"abc" not in rest
    finally:
        writer.close()
    reader, writer = await _exchange(
        proxy.port, b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    try:
        status, _ = await _read_head(reader)
        assert status.startswith("HTTP/1.1 200")
    finally:
        writer.close()


async def test_a_connection_that_cannot_be_set_up_is_logged_once_per_cause(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure while accepting a client connection closes that connection and is logged
    at ERROR once per cause (asyncio alone would say nothing outside debug mode), and the
    proxy keeps serving once the cause is gone."""
    import structlog

    from proxy.wire.server import ClientConnection

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b"ok")

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    real = ClientConnection._setup

    def broken(self: ClientConnection, transport: asyncio.BaseTransport) -> None:
        raise RuntimeError("no buffer space for this connection")

    monkeypatch.setattr(ClientConnection, "_setup", broken)
    raw = b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            reader, writer = await _exchange(proxy.port, raw)
            try:
                assert await asyncio.wait_for(reader.read(), WAIT) == b""
            finally:
                writer.close()
    failures = [e for e in logs if e["event"] == "connection_setup_failed"]
    assert len(failures) == 1
    assert failures[0]["log_level"] == "error"
    assert failures[0]["error_type"] == "RuntimeError"
    monkeypatch.setattr(ClientConnection, "_setup", real)
    reader, writer = await _exchange(proxy.port, raw)
    try:
        status, _ = await _read_head(reader)
        assert status.startswith("HTTP/1.1 200")
    finally:
        writer.close()
