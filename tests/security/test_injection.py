"""CRLF and smuggling attempts in forwarded values: nothing extra ever reaches the target."""

from __future__ import annotations

import pytest

from proxy import AuthProxy

from .conftest import Recorder
from .raw import exchange, get_ok, parse, request


def header_names(recorder: Recorder) -> set[str]:
    return {k.lower() for s in recorder.seen for k, _ in s.headers}


@pytest.mark.parametrize("target", [
    "/mcp%0d%0aX-Injected:%201",
    "/mcp?q=%0D%0AX-Injected:%201",
    "/mcp?q=a%0d%0a%0d%0aGET%20/admin%20HTTP/1.1",
    "/mcp%00?x=%00",
    "/mcp/..%2f..%2fetc",
])
async def test_encoded_crlf_in_path_and_query_is_forwarded_verbatim_and_inert(
    proxy: AuthProxy, recorder: Recorder, target: str
) -> None:
    """Percent-encoded CR/LF stays encoded: the target sees the same bytes and no new header."""
    answer = await request(proxy.port, ["Host: 127.0.0.1"], target=target)
    assert answer is not None and answer.status == 200
    (seen,) = recorder.seen
    assert seen.raw_path == target
    assert "x-injected" not in header_names(recorder)


def raw_get(start: bytes, *fields: bytes) -> bytes:
    """A GET of `start` and `fields` byte for byte, between Host and `Connection: close`."""
    return b"\r\n".join([start, b"Host: 127.0.0.1", *fields, b"Connection: close"]) + b"\r\n\r\n"


@pytest.mark.parametrize("raw", [
    raw_get(b"GET /mcp\rX-Injected: 1 HTTP/1.1"),
    raw_get(b"GET /mcp\nX-Injected: 1 HTTP/1.1"),
    raw_get(b"GET /mcp HTTP/1.1", b"X-A: a\rX-Injected: 1"),
    raw_get(b"GET /mcp HTTP/1.1", b"X-A: a\nX-Injected : 1"),
    raw_get(b"GET /mcp HTTP/1.1", b"X-A:\r\n X-Injected: 1"),
])
async def test_raw_line_breaks_in_the_request_never_turn_into_headers_at_the_target(
    proxy: AuthProxy, recorder: Recorder, raw: bytes
) -> None:
    """A bare CR or LF inside a request line or header cannot add a header upstream."""
    answer = parse(await exchange(proxy.port, raw))
    assert answer is None or answer.status in (200, 400, 505), answer.head
    assert "x-injected" not in header_names(recorder)
    for seen in recorder.seen:
        for name, value in seen.headers:
            assert "\r" not in value and "\n" not in value, (name, value)
    await get_ok(proxy.port)


async def test_a_pipelined_second_request_is_not_hidden_inside_the_first(
    proxy: AuthProxy, recorder: Recorder
) -> None:
    """A body that looks like a request is forwarded as a body, and a real second request as one."""
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    raw = (b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled)
           + b"GET /mcp?second=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    await exchange(proxy.port, raw)
    assert [(s.method, s.raw_path) for s in recorder.seen] == [
        ("POST", "/mcp"), ("GET", "/mcp?second=1")]
    assert recorder.seen[0].body == smuggled


async def test_hop_by_hop_names_listed_in_connection_are_dropped(
    proxy: AuthProxy, recorder: Recorder
) -> None:
    """A client cannot strip or smuggle the target's headers through the Connection header."""
    answer = await request(proxy.port, [
        "Host: 127.0.0.1", "Connection: X-Secret-Thing, keep-alive", "X-Secret-Thing: 1",
        "Keep-Alive: timeout=5", "TE: trailers", "Upgrade: websocket", "Proxy-Connection: x",
    ])
    assert answer is not None and answer.status == 200
    names = header_names(recorder)
    for name in ("x-secret-thing", "keep-alive", "te", "upgrade", "proxy-connection"):
        assert name not in names
