"""Which of the three relay paths (`proxy.forwarding.relay`) an answer takes, and that each
delivers the target's body whole: raw sockets on the client side, where framing shows."""

from __future__ import annotations

import asyncio

from proxy.forwarding.relay import COMPLETE, PUSHED, REWRITTEN

from helpers import WAIT, ProxyFactory, RawConn, RawServe, RawUpstreamFactory, unchunk

JSON = b'{"jsonrpc":"2.0","id":1,"result":{}}'


async def _ask(port: int, raw: bytes) -> bytes:
    """Send `raw` and read until the proxy closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        return await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()


def _post(version: str = "1.1", path: str = "/mcp") -> bytes:
    return (f"POST {path} HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            f"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}").encode()


def _target(first: bytes, rest: bytes = b"", *, go_on: asyncio.Event | None = None,
            close: bool = False) -> RawServe:
    """A raw target answering one request: `first`, then (once the client saw it and set
    `go_on`) `rest`; then it closes (`close`: the end of an unframed body) or waits for
    the proxy to."""
    async def serve(conn: RawConn) -> None:
        await conn.read_request()
        conn.writer.write(first)
        await conn.writer.drain()
        if go_on is not None:
            await asyncio.wait_for(go_on.wait(), WAIT)
        if rest:
            conn.writer.write(rest)
            await conn.writer.drain()
        if not close:
            await conn.reader.read()

    return serve


async def _ask_in_two(port: int, raw: bytes, seen: bytes, go_on: asyncio.Event) -> bytes:
    """Send `raw`, read until `seen` arrived (the answer is streaming), let the target go
    on, and read the rest until the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        first = await asyncio.wait_for(reader.readuntil(seen), WAIT)
        go_on.set()
        return first + await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
CHUNKED_A = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n8\r\ndata: a\n\r\n"
CHUNKED_B = b"8\r\ndata: b\n\r\n0\r\n\r\n"


async def test_a_whole_json_answer_takes_the_complete_path(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """A small JSON answer that arrives whole goes out in one piece by path `complete`."""
    upstream = await raw_upstream(_target(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(JSON), JSON)))
    proxy = await make_proxy(upstream.url())
    answer = await _ask(proxy.port, _post())
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n" + JSON)
    assert proxy.relay_counts == {COMPLETE: 1, PUSHED: 0, REWRITTEN: 0}


async def test_an_http10_client_gets_a_complete_answer_with_its_length(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """An HTTP/1.0 client's JSON answer comes by path `complete` with a Content-Length."""
    upstream = await raw_upstream(_target(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%b\r\n0\r\n\r\n" % (len(JSON), JSON)))
    proxy = await make_proxy(upstream.url())
    answer = await _ask(proxy.port, _post("1.0"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK")
    assert b"Content-Length: %d" % len(JSON) in head and b"chunked" not in head
    assert body == JSON
    assert proxy.relay_counts[COMPLETE] == 1


async def test_a_chunked_event_stream_takes_the_pushed_path(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """A POSTed event stream still coming after its head is pushed, its events whole."""
    go_on = asyncio.Event()
    upstream = await raw_upstream(_target(CHUNKED_A, CHUNKED_B, go_on=go_on))
    proxy = await make_proxy(upstream.url())
    answer = await _ask_in_two(proxy.port, _post(), b"data: a\n\r\n", go_on)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert unchunk(body) == b"data: a\ndata: b\n"
    assert proxy.relay_counts == {COMPLETE: 0, PUSHED: 1, REWRITTEN: 0}


async def test_an_event_stream_without_framing_is_pushed_until_the_target_closes(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """An event stream with neither length nor chunks (it ends when the target closes)
    is pushed whole, re-framed as chunks for the HTTP/1.1 client with a clean end."""
    go_on = asyncio.Event()
    upstream = await raw_upstream(_target(
        SSE_HEAD + b"Connection: close\r\n\r\ndata: a\n\n", b"data: b\n\n",
        go_on=go_on, close=True))
    proxy = await make_proxy(upstream.url())
    answer = await _ask_in_two(proxy.port, _post(), b"data: a\n\n", go_on)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert unchunk(body) == b"data: a\n\ndata: b\n\n"
    assert proxy.relay_counts == {COMPLETE: 0, PUSHED: 1, REWRITTEN: 0}


async def test_an_http10_client_gets_a_pushed_stream_until_the_proxy_closes(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """An HTTP/1.0 client cannot take chunks: its pushed stream is the bare events, ended
    by the proxy closing the connection."""
    go_on = asyncio.Event()
    upstream = await raw_upstream(_target(CHUNKED_A, CHUNKED_B, go_on=go_on))
    proxy = await make_proxy(upstream.url())
    answer = await _ask_in_two(proxy.port, _post("1.0"), b"data: a\n", go_on)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK") and b"Connection: close" in head
    assert b"chunked" not in head and b"Content-Length" not in head
    assert body == b"data: a\ndata: b\n"
    assert proxy.relay_counts == {COMPLETE: 0, PUSHED: 1, REWRITTEN: 0}


async def test_the_legacy_endpoint_stream_takes_the_rewritten_path(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """A GET event stream (the legacy SSE endpoint) goes through the rewriter: the target's
    absolute endpoint URL arrives moved to the proxy."""
    port_of_target: list[int] = []

    async def serve(conn: RawConn) -> None:
        await conn.read_request()
        target = f"http://127.0.0.1:{port_of_target[0]}/messages?s=1".encode()
        event = b"event: endpoint\ndata: " + target + b"\n\n"
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(event), event))
        await conn.writer.drain()
        await conn.reader.read()

    upstream = await raw_upstream(serve)
    url = upstream.url()
    port_of_target.append(int(url.rsplit(":", 1)[1].split("/")[0]))
    proxy = await make_proxy(url)
    answer = await _ask(proxy.port, b"GET /sse HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                    b"Connection: close\r\n\r\n" % proxy.port)
    body = unchunk(answer.partition(b"\r\n\r\n")[2])
    assert body == f"event: endpoint\ndata: http://127.0.0.1:{proxy.port}/messages?s=1\n\n".encode()
    assert proxy.relay_counts == {COMPLETE: 0, PUSHED: 0, REWRITTEN: 1}
