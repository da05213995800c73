"""The lean upstream pool: kept-alive connections reused, stale ones retried, idle ones
closed on time and at shutdown, and requests written byte-exact in one piece."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.wire.client import request_head

from helpers import (
    WAIT,
    ProxyFactory,
    RawConn,
    RawServe,
    RawUpstream,
    RawUpstreamFactory,
    UpstreamFactory,
    chunk,
)

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def answering(answer: Callable[[int, int], Any]) -> RawServe:
    """Answer request `index` on connection `number` with `answer(number, index)`: the
    bytes to send, or None to hang up (or a coroutine giving either)."""

    async def serve(conn: RawConn) -> None:
        for index in range(1000):
            await conn.read_request()
            reply = answer(conn.number, index)
            if asyncio.iscoroutine(reply):
                reply = await reply
            if reply is None:
                return
            await conn.send(reply)

    return serve


async def start(raw_upstream: RawUpstreamFactory,
                answer: Callable[[int, int], Any]) -> tuple[RawUpstream, str]:
    upstream: RawUpstream = await raw_upstream(answering(answer))
    return upstream, upstream.url()


async def call(client: aiohttp.ClientSession, url: str, method: str = "POST",
               data: bytes | None = b'{"jsonrpc":"2.0","id":1}') -> tuple[int, bytes]:
    async with asyncio.timeout(WAIT):
        async with client.request(method, url, data=data) as resp:
            return resp.status, await resp.read()


async def test_sequential_requests_share_one_upstream_connection(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
) -> None:
    """Back-to-back calls do not pay a new upstream connection each."""
    upstream, url = await start(raw_upstream, lambda conn, index: ANSWER)
    proxy = await make_proxy(url)
    for _ in range(5):
        assert await call(client, proxy.url) == (200, b"ok")
    assert upstream.connections == 1
    assert len(upstream.requests) == 5


async def test_concurrent_requests_are_not_queued_behind_a_pool_limit(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
) -> None:
    """Many slow calls at once all reach the target at once instead of waiting in line."""
    release = asyncio.Event()

    async def gated(conn: int, index: int) -> bytes:
        await release.wait()  # every call is held at the target until all have arrived
        return ANSWER

    upstream, url = await start(raw_upstream, gated)
    proxy = await make_proxy(url)

    n = 150
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as many:
        calls = [asyncio.create_task(call(many, proxy.url)) for _ in range(n)]
        try:
            await upstream.wait_for(lambda: len(upstream.requests) == n)
        finally:
            release.set()
        results = await asyncio.gather(*calls)
    assert all(result == (200, b"ok") for result in results)


async def test_a_kept_alive_connection_the_target_dropped_is_retried_for_a_get(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
) -> None:
    """A target that silently drops an idle keep-alive connection costs a GET nothing."""
    # The first connection answers once, then hangs up on the next request unanswered:
    # what a target whose keep-alive timer fired just as the proxy reused it does.
    upstream, url = await start(raw_upstream,
        lambda conn, index: ANSWER if (conn, index) != (1, 1) else None)
    proxy = await make_proxy(url)
    assert await call(client, proxy.url, "GET", None) == (200, b"ok")
    assert await call(client, proxy.url, "GET", None) == (200, b"ok")
    assert upstream.connections == 2


async def test_a_post_on_a_dropped_connection_is_not_sent_twice(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
) -> None:
    """A tool call the target may have seen is never repeated behind the client's back."""
    upstream, url = await start(raw_upstream,
        lambda conn, index: ANSWER if (conn, index) != (1, 1) else None)
    proxy = await make_proxy(url)
    assert await call(client, proxy.url) == (200, b"ok")
    status, _ = await call(client, proxy.url)
    assert status == 502
    assert len(upstream.requests) == 2


async def test_idle_upstream_connections_close_after_upstream_idle_timeout(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
) -> None:
    """The proxy does not hold the target's connections open forever after traffic stops."""
    upstream, url = await start(raw_upstream, lambda conn, index: ANSWER)
    proxy = await make_proxy(url, upstream_idle_timeout=0.2)
    assert await call(client, proxy.url) == (200, b"ok")
    assert upstream.open == 1
    await upstream.wait_for(lambda: upstream.open == 0)


async def test_shutdown_closes_idle_upstream_connections(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
) -> None:
    """Stopping the proxy leaves no connection open at the target."""
    upstream, url = await start(raw_upstream, lambda conn, index: ANSWER)
    proxy = await make_proxy(url)
    assert await call(client, proxy.url) == (200, b"ok")
    await proxy.shutdown(drain_timeout=0.5)
    await upstream.wait_for(lambda: upstream.open == 0)


async def test_the_request_reaches_the_target_byte_exact_with_host_first(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
) -> None:
    """The target sees the client's path, query and body untouched and its own Host."""
    upstream, url = await start(raw_upstream, lambda conn, index: ANSWER)
    proxy = await make_proxy(url)
    body = b'{"jsonrpc":"2.0","id":7,"method":"tools/call"}'
    target = proxy.url.replace("/mcp", "/mcp/a%2Fb?x=1&y=%20")
    assert await call(client, target, data=body) == (200, b"ok")
    sent = upstream.requests[0]
    head, _, received = sent.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /mcp/a%2Fb?x=1&y=%20 HTTP/1.1"
    assert lines[1] == b"Host: " + url.split("/")[2].encode()
    assert received == body
    assert sum(line.lower().startswith(b"content-length:") for line in lines) == 1


def test_request_head_refuses_a_line_break_in_any_header() -> None:
    """A value carrying CR or LF can never smuggle a second request to the target."""
    for value in ("a\r\nX-Evil: 1", "a\nb", "a\rb"):
        with pytest.raises(ValueError):
            request_head("GET", "/", "t", CIMultiDict({"X-A": value}), None)
    with pytest.raises(ValueError):
        request_head("GET", "/\r\nX: y", "t", CIMultiDict({"X-A": "1"}), None)
    with pytest.raises(ValueError):
        request_head("GET", "/", "t\r\nX: y", CIMultiDict({"X-A": "1"}), None)


def test_request_head_sets_content_length_like_a_client_would() -> None:
    """An in-memory body gets its length; a body-less POST says 0; a GET says nothing."""
    head = request_head("POST", "/m", "h:1", CIMultiDict({"A": "1"}), b"abc")
    assert head == b"POST /m HTTP/1.1\r\nHost: h:1\r\nA: 1\r\nContent-Length: 3\r\n\r\n"
    head = request_head("POST", "/m", "h", CIMultiDict({"A": "1"}), None)
    assert b"\r\nContent-Length: 0\r\n" in head
    head = request_head("GET", "/m", "h", CIMultiDict({"A": "1"}), None)
    assert b"Content-Length" not in head
    kept = request_head("POST", "/m", "h", CIMultiDict({"Content-Length": "3"}), b"abc")
    assert kept.count(b"Content-Length") == 1


async def test_a_response_timeout_cuts_only_the_request_that_ran_out(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
) -> None:
    """A hung call gets its 504 while calls on other connections keep being answered."""
    hang = asyncio.Event()  # never set: the first connection's request hangs

    async def answer(conn: int, index: int) -> bytes:
        if conn == 1:
            await hang.wait()
        return ANSWER

    upstream, url = await start(raw_upstream, answer)
    proxy = await make_proxy(url, response_timeout=0.3)
    hung = asyncio.create_task(call(client, proxy.url))
    await upstream.wait_for(lambda: len(upstream.requests) == 1)
    async with aiohttp.ClientSession() as other:
        for _ in range(3):
            assert await call(other, proxy.url) == (200, b"ok")
    status, body = await hung
    assert status == 504
    assert b"gateway_timeout" in body
    assert await call(client, proxy.url) == (200, b"ok")  # the proxy goes on serving


def test_tune_gc_for_serving_keeps_collecting_cycles() -> None:
    """The serving GC settings still free reference cycles, only less often."""
    import gc
    import weakref

    from proxy.forwarding.listener import SERVING_GC_THRESHOLD, tune_gc_for_serving

    before = gc.get_threshold()
    try:
        tune_gc_for_serving()
        assert gc.get_threshold() == SERVING_GC_THRESHOLD

        class Node:
            other: Any = None

        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


async def test_posted_event_stream_events_arrive_one_by_one(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
) -> None:
    """Each event of a streamed tool-call answer reaches the client before the next is sent."""
    from aiohttp import web

    sent = asyncio.Queue[int]()
    seen = asyncio.Queue[int]()

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(5):
            await response.write(b"event: message\ndata: {\"n\": %d}\n\n" % i)
            await sent.put(i)
            await seen.get()  # the next event only after the client saw this one
        await response.write_eof()
        return response

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with asyncio.timeout(WAIT):
        async with client.post(proxy.url, data=b'{"jsonrpc":"2.0","id":1}') as resp:
            assert resp.status == 200
            for i in range(5):
                assert await sent.get() == i
                line = b""
                while not line.startswith(b"data:"):
                    line = await resp.content.readline()
                assert line == b'data: {"n": %d}\n' % i
                await seen.put(i)
            assert await resp.content.read() == b"\n"  # the last event's blank line


async def test_a_target_dying_mid_event_stream_ends_the_clients_stream_with_an_error(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
) -> None:
    """A streamed answer cut by the target is an error for the client, never a clean end."""
    cut = asyncio.Event()

    async def serve(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"data: 1\n\n"))
        await cut.wait()
        conn.writer.transport.abort()

    upstream = await raw_upstream(serve)
    proxy = await make_proxy(upstream.url())
    async with asyncio.timeout(WAIT):
        async with client.post(proxy.url, data=b"{}") as resp:
            assert await resp.content.readline() == b"data: 1\n"
            cut.set()
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.content.read()


async def test_a_client_leaving_a_posted_event_stream_frees_the_target(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
) -> None:
    """Hanging up on a streamed answer closes the target's stream too."""
    from aiohttp import web

    started = asyncio.Event()
    ended = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        started.set()
        try:
            while True:
                await asyncio.sleep(0.01)
                await response.write(b": keep-alive\n\n")
        except (ConnectionError, asyncio.CancelledError):
            ended.set()
            raise

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with asyncio.timeout(WAIT):
        resp = await client.post(proxy.url, data=b"{}")
        assert await resp.content.readline() == b"data: first\n"
        await started.wait()
        resp.close()
        await ended.wait()


async def test_one_connection_parses_answer_after_answer_of_every_shape(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
) -> None:
    """The pooled connection keeps one parser across answers: a HEAD's bodiless answer,
    a 204, an interim 100 and a chunked body in between must not shift the framing."""
    answers = [
        ANSWER,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",  # to the HEAD: no body follows
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ninterim",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        ANSWER,
    ]
    upstream, url = await start(raw_upstream, lambda conn, index: answers[index])
    proxy = await make_proxy(url)
    assert await call(client, proxy.url) == (200, b"ok")
    assert await call(client, proxy.url, "HEAD", None) == (200, b"")
    assert await call(client, proxy.url) == (204, b"")
    assert await call(client, proxy.url) == (200, b"interim")
    assert await call(client, proxy.url, "GET", None) == (200, b"abcde")
    assert await call(client, proxy.url) == (200, b"ok")
    assert upstream.connections == 1 and len(upstream.requests) == 6


def test_tune_malloc_for_serving_applies_where_glibc_is() -> None:
    """On glibc the serving trim threshold is accepted (a bulk download then does not give
    the heap back and take it again on every read); elsewhere it is a no-op, not an error."""
    import platform

    from proxy.forwarding.listener import tune_malloc_for_serving

    applied = tune_malloc_for_serving()
    if platform.libc_ver()[0] == "glibc":
        assert applied
