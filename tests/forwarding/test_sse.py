"""The legacy HTTP+SSE `endpoint` rewrite: pure transformer and through the proxy."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from proxy.forwarding.sse import (
    MAX_BYTES_INSPECTED,
    MAX_EVENTS_INSPECTED,
    EndpointRewriter,
    rewrite_endpoint_url,
)

from helpers import WAIT, ProxyFactory, UpstreamFactory

TARGET = URL("https://mcp.example:8443")
PROXY = "http://127.0.0.1:9000"


def run(chunks: list[bytes]) -> bytes:
    rewriter = EndpointRewriter(TARGET, PROXY)
    return b"".join(rewriter.feed(c) for c in chunks) + rewriter.flush()


def test_absolute_endpoint_urls_on_the_target_move_to_the_proxy() -> None:
    """A client told to post to the target directly is told to post to the proxy instead."""
    assert (rewrite_endpoint_url("https://mcp.example:8443/messages?sessionId=a%2Fb",
                                 TARGET, PROXY)
            == "http://127.0.0.1:9000/messages?sessionId=a%2Fb")
    assert rewrite_endpoint_url("//mcp.example:8443/m", TARGET, PROXY) == PROXY + "/m"


def test_relative_and_foreign_endpoint_urls_stay_as_they_are() -> None:
    """Relative URLs already resolve against the proxy; other origins are not ours."""
    for value in ("/messages?session_id=1", "messages", "https://other.example/m",
                  "http://mcp.example:8443/m", "https://mcp.example/m"):
        assert rewrite_endpoint_url(value, TARGET, PROXY) == value


def test_the_endpoint_event_is_rewritten_and_the_rest_passes_byte_for_byte() -> None:
    """Only the data line of the endpoint event changes."""
    stream = (b": hello\r\n\r\n"
              b"event: endpoint\r\ndata: https://mcp.example:8443/messages?s=1\r\n\r\n"
              b"event: message\r\ndata: https://mcp.example:8443/x\r\n\r\n")
    assert run([stream]) == (
        b": hello\r\n\r\n"
        b"event: endpoint\r\ndata: http://127.0.0.1:9000/messages?s=1\r\n\r\n"
        b"event: message\r\ndata: https://mcp.example:8443/x\r\n\r\n"
    )


def test_a_stream_without_endpoint_event_is_untouched_and_parsing_stops() -> None:
    """A Streamable HTTP stream costs only a look at its first events."""
    events = [b"data: {\"n\": %d}\n\n" % i for i in range(MAX_EVENTS_INSPECTED + 3)]
    rewriter = EndpointRewriter(TARGET, PROXY)
    out = [rewriter.feed(e) for e in events]
    assert out == events
    assert rewriter.passthrough


def test_lines_of_any_length_pass() -> None:
    """There is no line-length limit: a huge event goes through intact."""
    big = b"data: " + b"x" * 2_000_000 + b"\n\n"
    assert run([big[:1000], big[1000:]]) == big


def test_a_first_event_longer_than_the_inspected_prefix_is_passed_on_as_it_comes() -> None:
    """An unfinished event is held only up to the bounded prefix: past it, every byte goes
    on at once, and nothing more is scanned."""
    rewriter = EndpointRewriter(TARGET, PROXY)
    start = b"data: " + b"x" * (MAX_BYTES_INSPECTED // 2)
    assert rewriter.feed(start) == b""  # may still turn out to be the endpoint event
    rest = b"x" * MAX_BYTES_INSPECTED
    assert rewriter.feed(rest) == start + rest
    assert rewriter.passthrough
    assert rewriter.feed(b"\n\n") == b"\n\n"


def test_an_endpoint_event_past_the_inspected_prefix_is_left_alone() -> None:
    """The legacy transport announces its endpoint first; one that comes after the
    prefix is not looked for."""
    size = MAX_BYTES_INSPECTED // (MAX_EVENTS_INSPECTED - 1) + 1
    filler = b": %s\n\n" % (b"c" * size) * (MAX_EVENTS_INSPECTED - 1)  # few events, many bytes
    late = b"event: endpoint\ndata: https://mcp.example:8443/m\n\n"
    rewriter = EndpointRewriter(TARGET, PROXY)
    assert b"".join(rewriter.feed(filler[i:i + 500]) for i in range(0, len(filler), 500)) \
        + rewriter.feed(late) + rewriter.flush() == filler + late


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=12),
       st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_any_chunking_gives_the_same_stream(cuts: list[int], newline: bytes) -> None:
    """However the network splits the stream, the client receives the same bytes."""
    text = (b": c" + newline + newline + b"event: endpoint" + newline
            + b"data: https://mcp.example:8443/messages" + newline + newline
            + b"data: tail" + newline + newline)
    expected = text.replace(b"https://mcp.example:8443", PROXY.encode())
    points = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert run(chunks) == expected


async def test_a_legacy_sse_client_is_sent_back_through_the_proxy(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Posting to the announced endpoint goes through the proxy and reaches the target."""
    posted: list[bytes] = []
    upstream_holder: list[Any] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            posted.append(await request.read())
            return web.Response(status=202)
        endpoint = upstream_holder[0].make_url("/messages?session_id=42")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"event: endpoint\ndata: " + str(endpoint).encode() + b"\n\n")
        await asyncio.sleep(3600)
        return resp

    upstream = await make_upstream(handler)
    upstream_holder.append(upstream)
    proxy = await make_proxy(str(upstream.make_url("/sse")))
    async with client.get(proxy.url) as resp:
        event = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), WAIT)
        endpoint = event.split(b"data: ")[1].strip().decode()
        assert endpoint == f"http://127.0.0.1:{proxy.port}/messages?session_id=42"
        async with client.post(endpoint, data=b'{"jsonrpc": "2.0"}') as posted_resp:
            assert posted_resp.status == 202
    assert posted == [b'{"jsonrpc": "2.0"}']
