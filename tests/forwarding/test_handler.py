"""The forwarding path end to end: a real client, the proxy, a real loopback upstream."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs
from yarl import URL

from proxy.forwarding.observe import Exchange

from helpers import WAIT, ProxyFactory, UpstreamFactory, eventually


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({
        "method": request.method,
        "raw_path": request.raw_path,
        "headers": list(request.headers.items()),
        "body": body.decode("latin-1"),
    })


def header_names(seen: dict[str, Any]) -> set[str]:
    return {name.lower() for name, _ in seen["headers"]}


async def test_every_method_path_and_query_reach_the_target_byte_for_byte(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A client's method, encoded path and query arrive at the target exactly as sent."""
    upstream = await make_upstream(echo)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    raw = "/a%2Fb/%7Euser/x;p=1?q=%2F&q=2&sp=a+b&e=%41"
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        url = URL(f"http://127.0.0.1:{proxy.port}{raw}", encoded=True)
        async with client.request(method, url, data=b"x" if method != "GET" else None) as resp:
            seen = await resp.json()
        assert resp.status == 200
        assert seen["method"] == method
        assert seen["raw_path"] == raw


async def test_target_query_is_added_to_requests_for_the_target_path_only(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Query parameters of --target-url (an API key) reach the target path, nowhere else."""
    upstream = await make_upstream(echo)
    proxy = await make_proxy(str(upstream.make_url("/mcp")) + "?key=abc&v=2")
    async with client.post(URL(proxy.url + "?v=9&x=1", encoded=True), data=b"{}") as resp:
        assert (await resp.json())["raw_path"] == "/mcp?v=9&x=1&key=abc"
    async with client.get(proxy.url) as resp:
        assert (await resp.json())["raw_path"] == "/mcp?key=abc&v=2"
    async with client.get(f"http://127.0.0.1:{proxy.port}/.well-known/x") as resp:
        assert (await resp.json())["raw_path"] == "/.well-known/x"
    assert proxy.url == f"http://127.0.0.1:{proxy.port}/mcp"


async def test_each_sse_event_reaches_the_client_while_the_stream_stays_open(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The first event arrives at once, not when the target ends the stream."""
    second = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"event: message\ndata: {\"id\": 1}\n\n")
        await asyncio.wait_for(second.wait(), WAIT)
        await resp.write(b"data: 2\n\n")
        return resp

    upstream = await make_upstream(stream)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with client.get(proxy.url) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), WAIT)
        assert first == b"event: message\ndata: {\"id\": 1}\n\n"
        second.set()
        assert await asyncio.wait_for(resp.content.read(), WAIT) == b"data: 2\n\n"


async def test_a_chunked_upload_streams_to_the_target_as_it_is_sent(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The target reads the first part of an upload before the client has sent the rest."""
    got_first = asyncio.Event()
    received: list[bytes] = []

    async def reader(request: web.Request) -> web.Response:
        assert request.headers.get("Transfer-Encoding") == "chunked"
        first = await request.content.readany()
        received.append(first)
        got_first.set()
        received.append(await request.content.read())
        return web.Response(text=str(len(b"".join(received))))

    async def body() -> Any:
        yield b"part-one;"
        await asyncio.wait_for(got_first.wait(), WAIT)
        yield b"part-two"

    upstream = await make_upstream(reader)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with client.post(proxy.url, data=body()) as resp:
        assert resp.status == 200
        assert await resp.text() == "17"
    assert received[0] == b"part-one;"


async def test_the_clients_content_length_is_kept(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A body sent with Content-Length reaches the target with that length, not chunked."""
    upstream = await make_upstream(echo)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with client.post(proxy.url, data=b"0123456789") as resp:
        seen = await resp.json()
    headers = dict((k.lower(), v) for k, v in seen["headers"])
    assert headers["content-length"] == "10"
    assert "transfer-encoding" not in headers
    assert seen["body"] == "0123456789"


async def test_hop_by_hop_headers_are_dropped_both_ways(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Connection-specific headers, and those named in Connection, never cross the proxy."""
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.Response:
        seen.update(headers=list(request.headers.items()))
        return web.Response(text="ok", headers={
            "Connection": "keep-alive, X-Up-Hop", "X-Up-Hop": "1", "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic realm=x", "Trailer": "X-T", "X-Kept": "yes",
        })

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with client.get(proxy.url, headers={
        "Connection": "keep-alive, X-Down-Hop", "X-Down-Hop": "1", "Keep-Alive": "300",
        "TE": "trailers", "Trailer": "X-T", "Proxy-Authorization": "Basic c2VjcmV0",
        "Proxy-Connection": "keep-alive", "X-Kept": "yes",
    }) as resp:
        assert await resp.text() == "ok"
        got = {k.lower() for k in resp.headers}
    assert {"x-up-hop", "keep-alive", "proxy-authenticate", "trailer"}.isdisjoint(got)
    assert resp.headers["X-Kept"] == "yes"
    names = header_names(seen)
    assert {"x-down-hop", "keep-alive", "te", "trailer", "proxy-authorization",
            "proxy-connection"}.isdisjoint(names)
    assert "x-kept" in names


async def test_mcp_headers_and_encoded_bodies_pass_untouched(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Session ids, protocol version, Last-Event-ID and gzip bodies arrive as sent."""
    packed = gzip.compress(b'{"jsonrpc": "2.0"}')
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.Response:
        seen.update(headers=dict(request.headers), body=await request.read())
        return web.Response(body=packed, headers={
            "Content-Encoding": "gzip", "Content-Type": "application/json",
            "Mcp-Session-Id": "s-1", "WWW-Authenticate": 'Bearer error="x"',
        })

    upstream = await make_upstream(handler, auto_decompress=False)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with client.post(proxy.url, data=packed, headers={
        "Mcp-Session-Id": "s-1", "MCP-Protocol-Version": "2025-06-18", "Last-Event-ID": "7",
        "Content-Encoding": "gzip", "Accept-Encoding": "gzip",
    }) as resp:
        assert await resp.read() == packed
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Mcp-Session-Id"] == "s-1"
        assert resp.headers["WWW-Authenticate"] == 'Bearer error="x"'
    assert seen["body"] == packed
    assert seen["headers"]["Mcp-Session-Id"] == "s-1"
    assert seen["headers"]["MCP-Protocol-Version"] == "2025-06-18"
    assert seen["headers"]["Last-Event-ID"] == "7"
    assert seen["headers"]["Accept-Encoding"] == "gzip"
    assert "User-Agent" not in seen["headers"]


async def test_forwarded_headers_are_replaced_with_the_proxys_own(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The target sees the real client address and its own scheme, never a client's claims."""
    upstream = await make_upstream(echo)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with client.get(proxy.url, headers={
        "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil", "X-Forwarded-Proto": "https",
        "Forwarded": "for=6.6.6.6", "Host": "localhost",
    }) as resp:
        seen = await resp.json()
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["host"] == f"127.0.0.1:{upstream.port}"
    assert "x-forwarded-host" not in headers
    assert "forwarded" not in headers


async def test_a_307_redirect_on_the_targets_origin_is_followed_with_method_and_body(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A client that cannot follow redirects still gets its POST answered."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/mcp":
            return web.Response(status=307, headers={"Location": "/mcp/"})
        return await echo(request)

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with client.post(proxy.url, data=b'{"id": 1}') as resp:
        seen = await resp.json()
    assert resp.status == 200
    assert (seen["method"], seen["raw_path"], seen["body"]) == ("POST", "/mcp/", '{"id": 1}')


async def test_a_303_redirect_turns_into_a_get_without_body(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """See Other is followed like a browser does: GET, no body."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/mcp":
            await request.read()
            return web.Response(status=303, headers={"Location": "/done"})
        return await echo(request)

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with client.post(proxy.url, data=b"payload") as resp:
        seen = await resp.json()
    assert (seen["method"], seen["raw_path"], seen["body"]) == ("GET", "/done", "")
    assert "content-length" not in header_names(seen)


async def test_a_redirect_loop_stops_after_ten_and_reaches_the_client(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """An endless redirect ends with the eleventh redirect passed to the client."""
    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=302, headers={"Location": f"/r{len(hits)}"})

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with client.get(proxy.url, allow_redirects=False) as resp:
        assert resp.status == 302
    assert len(hits) == 11


async def test_a_redirect_to_another_origin_is_passed_to_the_client(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The proxy never follows a redirect off the target's origin itself."""
    other_hits: list[str] = []

    async def other(request: web.Request) -> web.Response:
        other_hits.append(request.path)
        return web.Response(text="other")

    elsewhere = await make_upstream(other)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": str(elsewhere.make_url("/x"))})

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with client.post(proxy.url, data=b"{}", allow_redirects=False) as resp:
        assert resp.status == 307
        assert resp.headers["Location"] == str(elsewhere.make_url("/x"))
    assert other_hits == []


async def test_a_disallowed_or_repeated_origin_gets_403_and_loopback_origins_pass(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A web page from another site cannot drive the proxy; local pages and non-browsers can."""
    upstream = await make_upstream(echo)
    proxy = await make_proxy(str(upstream.make_url("/mcp")),
                             allowed_origins=("https://app.example",))
    for origin in ("http://localhost:3000", "https://127.0.0.1", "http://[::1]:9",
                   "https://app.example", None):
        headers = {"Origin": origin} if origin else {}
        async with client.get(proxy.url, headers=headers) as resp:
            assert resp.status == 200, origin
    for origin in ("https://evil.example", "null", "http://localhost.evil.example"):
        async with client.get(proxy.url, headers={"Origin": origin}) as resp:
            assert resp.status == 403, origin
            assert (await resp.json())["error"] == "forbidden_origin"
    two = [("Origin", "http://localhost"), ("Origin", "http://localhost")]
    async with client.get(proxy.url, headers=two) as resp:
        assert resp.status == 403


async def test_a_foreign_host_on_a_loopback_bind_gets_421(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """DNS rebinding: a request naming some other host is refused; loopback names pass."""
    upstream = await make_upstream(echo)
    proxy = await make_proxy(str(upstream.make_url("/mcp")), allowed_hosts=("proxy.lan",))
    for host in ("localhost", f"localhost:{proxy.port}", "127.0.0.1:1", "[::1]:80",
                 "proxy.lan", f"proxy.lan:{proxy.port}"):
        async with client.get(proxy.url, headers={"Host": host}) as resp:
            assert resp.status == 200, host
    for host in ("evil.example", f"evil.example:{proxy.port}", "127.0.0.1.evil.example"):
        async with client.get(proxy.url, headers={"Host": host}) as resp:
            assert resp.status == 421, host
            assert (await resp.json())["error"] == "misdirected_request"


async def test_a_body_announced_too_large_gets_413_and_never_reaches_the_target(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A Content-Length above --max-request-bytes is refused before anything is sent."""
    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response()

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")), max_request_bytes=100)
    async with client.post(proxy.url, data=b"x" * 101) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "payload_too_large"
    async with client.post(proxy.url, data=b"x" * 100) as resp:
        assert resp.status == 200
    assert hits == ["/mcp"]


async def test_a_chunked_body_crossing_the_limit_gets_413_and_the_target_never_gets_it_all(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The upload is cut off as soon as it crosses the limit."""
    received: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        total = 0
        try:
            async for chunk in request.content.iter_any():
                total += len(chunk)
        except (aiohttp.ClientError, ConnectionError):
            pass
        finally:
            received.append(total)
        return web.Response()

    async def body() -> Any:
        for _ in range(20):
            yield b"y" * 1000

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")), max_request_bytes=5000)
    try:
        async with client.post(proxy.url, data=body()) as resp:
            assert resp.status == 413
    except aiohttp.ClientError:
        pass  # the proxy may close the connection while the client is still sending
    # A later request through the same proxy and target orders things: whatever the
    # target got of the big upload, it has finished with it by now.
    async with client.post(proxy.url, data=b"small") as resp:
        assert resp.status == 200
    await eventually(lambda: 5 in received)
    assert all(total < 20_000 for total in received)


async def test_an_unreachable_target_gets_502(
    make_proxy: ProxyFactory, client: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    """A target that refuses connections is a 502 with a JSON reason, not a hang."""
    proxy = await make_proxy(f"http://127.0.0.1:{unused_tcp_port}/mcp")
    async with client.post(proxy.url, data=b"{}") as resp:
        assert resp.status == 502
        assert (await resp.json())["error"] == "bad_gateway"


async def test_a_target_without_response_headers_in_time_gets_504(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A target that never answers is a 504 after --response-timeout."""
    never = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")), response_timeout=0.2)
    async with client.get(proxy.url) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"] == "gateway_timeout"


async def test_a_client_hanging_up_on_an_idle_stream_frees_the_target_side(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Closing an SSE stream in the client closes the proxy's upstream connection too."""
    opened = asyncio.Event()
    closed = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": open\n\n")
        opened.set()
        try:
            await asyncio.sleep(3600)  # idle: nothing more to send
        except asyncio.CancelledError:
            closed.set()
            raise
        return resp

    upstream = await make_upstream(stream)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    resp = await client.get(proxy.url)
    await asyncio.wait_for(opened.wait(), WAIT)
    await asyncio.wait_for(resp.content.readuntil(b"\n\n"), WAIT)
    resp.close()
    await asyncio.wait_for(closed.wait(), 2.0)
    await eventually(lambda: proxy.in_flight == 0)


async def test_a_target_dying_mid_stream_ends_the_clients_stream_with_an_error(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The client sees a broken stream at once, not a clean end and not a hang."""
    die = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        await asyncio.wait_for(die.wait(), WAIT)
        assert request.transport is not None
        request.transport.abort()
        return resp

    upstream = await make_upstream(stream)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with client.get(proxy.url) as resp:
        assert await asyncio.wait_for(resp.content.readuntil(b"\n\n"), WAIT) == b"data: 1\n\n"
        die.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.content.read(), WAIT)


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.responses: list[tuple[int, bool]] = []
        self.completed: list[tuple[int, int, bool]] = []
        self.fail = fail

    def on_response(self, exchange: Exchange) -> None:
        self.responses.append((exchange.status, exchange.upstream_headers is not None))
        if self.fail:
            raise RuntimeError("observer bug")

    def on_complete(self, exchange: Exchange, duration: float, bytes_out: int) -> None:
        self.completed.append((exchange.status, bytes_out, exchange.upstream_headers is None))
        if self.fail:
            raise RuntimeError("observer bug")


async def test_observers_hear_each_request_once_and_a_failing_one_breaks_nothing(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Metrics and the auth monitor see every answer, the proxy's own included."""
    upstream = await make_upstream(_hello)
    good, bad = Recorder(), Recorder(fail=True)
    proxy = await make_proxy(str(upstream.make_url("/mcp")), observers=[bad, good])
    with capture_logs():
        async with client.get(proxy.url) as resp:
            assert await resp.text() == "hello"
        async with client.get(proxy.url, headers={"Origin": "https://evil.example"}) as resp:
            assert resp.status == 403
    await eventually(lambda: len(good.completed) == 2)
    assert good.responses == [(200, True)]
    assert good.completed[0] == (200, 5, False)
    assert good.completed[1][0] == 403 and good.completed[1][2]


async def test_each_request_is_logged_once_without_query_values_or_credentials(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The access log names method, path and statuses, never a token in the query."""
    upstream = await make_upstream(echo)
    proxy = await make_proxy(str(upstream.make_url("/mcp")) + "?api_key=sekrit")
    with capture_logs() as logs:
        async with client.get(proxy.url + "?token=abc123",
                              headers={"Authorization": "Bearer clienttoken"}) as resp:
            await resp.read()
        await eventually(lambda: any(e["event"] == "request" for e in logs))
    events = [e for e in logs if e["event"] == "request"]
    assert len(events) == 1
    event = events[0]
    assert event["method"] == "GET" and event["path"] == "/mcp"
    assert event["status"] == 200 and event["upstream_status"] == 200
    assert event["bytes_out"] > 0 and event["duration_ms"] >= 0
    assert event["client"] == "127.0.0.1"
    text = json.dumps(logs, default=str)
    for secret in ("sekrit", "abc123", "clienttoken"):
        assert secret not in text


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def test_head_gets_the_targets_headers_and_no_body(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """HEAD answers carry the target's Content-Length and Content-Type, and no body."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 42, content_type="application/json")

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with client.head(proxy.url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "42"
        assert resp.headers["Content-Type"] == "application/json"
        assert await resp.read() == b""


async def test_the_proxy_adds_no_content_type_or_server_of_its_own(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """What the client receives is the target's answer, not one the proxy dressed up."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Server": "target/1"})
        await resp.prepare(request)
        await resp.write(b"raw")
        return resp

    upstream = await make_upstream(handler)
    proxy = await make_proxy(str(upstream.make_url("/mcp")))
    async with client.get(proxy.url) as resp:
        assert await resp.read() == b"raw"
        assert resp.headers["Server"] == "target/1"
        # aiohttp's upstream itself adds application/octet-stream; it must pass unchanged.
        assert resp.headers.getall("Content-Type") == ["application/octet-stream"]
