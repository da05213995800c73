"""Property-based tests: header filtering, URL joining and the SSE endpoint rewriter.

Each property is the promise a user relies on, checked over many generated inputs:
no hop-by-hop header ever reaches the target, a path and query arrive byte for byte,
and a rewritten event stream differs from the original only in the endpoint URL.
Bounded (`max_examples`, no deadline) so the suite stays fast in CI.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.forwarding.rules import (
    HOP_BY_HOP,
    connection_tokens,
    merge_query,
    path_with_query,
    request_headers,
    response_headers,
    split_raw_path,
    upstream_url,
)
from proxy.forwarding.sse import EndpointRewriter

from .conftest import AuthProxyFactory, Recorder
from .raw import request

TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"
SPECIAL = sorted(HOP_BY_HOP | {"host", "forwarded", "x-forwarded-for", "x-forwarded-host",
                               "x-forwarded-proto", "authorization", "expect"})


def _random_case(name: str, flips: list[bool]) -> str:
    return "".join(c.upper() if f else c for c, f in zip(name, flips + [False] * len(name),
                                                          strict=False))


header_name = hs.one_of(
    hs.text(TOKEN_CHARS, min_size=1, max_size=12),
    hs.builds(_random_case, hs.sampled_from(SPECIAL), hs.lists(hs.booleans(), max_size=20)),
)
header_value = hs.text(hs.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)


@hs.composite
def header_sets(draw: hs.DrawFn) -> CIMultiDict[str]:
    pairs = draw(hs.lists(hs.tuples(header_name, header_value), max_size=15))
    headers: CIMultiDict[str] = CIMultiDict(pairs)
    named = draw(hs.lists(header_name, max_size=4))
    if named:
        headers.add("Connection", ", ".join(named))
    return headers


@settings(max_examples=150, deadline=None)
@given(headers=header_sets(), auth=hs.one_of(hs.none(), hs.just("Bearer injected")))
def test_no_hop_by_hop_header_ever_reaches_the_target(
    headers: CIMultiDict[str], auth: str | None
) -> None:
    """Whatever headers a client sends, connection-level ones never go upstream."""
    named = connection_tokens(headers)
    out = request_headers(headers, client_ip="127.0.0.1", target_scheme="https",
                          authorization=auth)
    lowered = [k.lower() for k in out]
    for name in lowered:
        assert name not in HOP_BY_HOP
        assert name not in ("host", "forwarded", "x-forwarded-host", "expect")
        assert name not in named or name in ("authorization", "x-forwarded-for",
                                             "x-forwarded-proto")
    assert out.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert out.getall("X-Forwarded-Proto") == ["https"]
    if auth is not None:
        assert out.getall("Authorization") == [auth]
    # Everything else passes through, in order, repeats kept.
    expected = [(k, v) for k, v in headers.items()
                if k.lower() not in HOP_BY_HOP | {"host", "forwarded", "expect"}
                and k.lower() not in named and not k.lower().startswith("x-forwarded-")
                and (auth is None or k.lower() != "authorization")]
    kept = [(k, v) for k, v in out.items()
            if k.lower() not in ("x-forwarded-for", "x-forwarded-proto")
            and (auth is None or k.lower() != "authorization")]
    assert kept == expected


@settings(max_examples=150, deadline=None)
@given(headers=header_sets())
def test_no_hop_by_hop_header_ever_reaches_the_client(headers: CIMultiDict[str]) -> None:
    """Whatever headers a target sends, connection-level ones never reach the client."""
    named = connection_tokens(headers)
    out = response_headers(CIMultiDictProxy(headers))
    expected = [(k, v) for k, v in headers.items()
                if k.lower() not in HOP_BY_HOP and k.lower() not in named]
    assert list(out.items()) == expected


PCHAR = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@"
pct = hs.builds(lambda b, upper: f"%{b:02X}" if upper else f"%{b:02x}",
                hs.integers(0, 255), hs.booleans())
segment = hs.lists(hs.one_of(hs.sampled_from(PCHAR), pct), max_size=8).map("".join)
raw_path = hs.lists(segment, min_size=1, max_size=5).map(lambda s: "/" + "/".join(s))
raw_query = hs.lists(hs.one_of(hs.sampled_from(PCHAR + "/?"), pct), max_size=20).map("".join)


@settings(max_examples=200, deadline=None)
@given(path=raw_path, query=raw_query, has_query=hs.booleans())
def test_path_and_query_survive_url_joining_byte_for_byte(
    path: str, query: str, has_query: bool
) -> None:
    """The URL the proxy builds for the target carries the client's path and query verbatim."""
    raw = f"{path}?{query}" if has_query else path
    got_path, got_query = split_raw_path(raw)
    assert got_path == path
    url = upstream_url("https://mcp.example:8443", path_with_query(got_path, got_query))
    assert url.raw_path_qs == (raw if query or not has_query else path)
    assert str(url) == "https://mcp.example:8443" + url.raw_path_qs


@settings(max_examples=100, deadline=None)
@given(query=raw_query, extra=hs.lists(hs.tuples(hs.text("abcxyz", min_size=1, max_size=3),
                                                 hs.text("0123", max_size=3)), max_size=3))
def test_target_url_parameters_never_change_the_clients_own_query(
    query: str, extra: list[tuple[str, str]]
) -> None:
    """Parameters of --target-url are only ever appended; the client's query stays a prefix."""
    target = URL("https://t.example/mcp?" + "&".join(f"{k}={v}" for k, v in extra),
                 encoded=True) if extra else URL("https://t.example/mcp")
    merged = merge_query(query, target)
    assert merged.startswith(query)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=raw_path, query=raw_query)
async def test_path_and_query_reach_a_real_target_byte_for_byte(
    make_authproxy: AuthProxyFactory, recorder: Recorder, path: str, query: str
) -> None:
    """Through the running proxy, the target receives exactly the path and query sent."""
    proxy = recorder.proxy
    if proxy is None:
        proxy = recorder.proxy = await make_authproxy(recorder.url)
    target = f"{path}?{query}" if query else path
    answer = await request(proxy.port, ["Host: 127.0.0.1"], target=target)
    assert answer is not None and answer.status == 200
    assert recorder.seen[-1].raw_path == target


# --- SSE ------------------------------------------------------------------------------

TARGET = URL("https://mcp.example:8443")
PROXY = "http://127.0.0.1:9000"
field_text = hs.text(hs.characters(min_codepoint=0x20, max_codepoint=0x7E,
                                   exclude_characters=":"), max_size=12)
url_rest = hs.lists(hs.one_of(hs.sampled_from(PCHAR + "/?"), pct), max_size=20).map(
    lambda s: "/" + "".join(s))


@hs.composite
def streams(draw: hs.DrawFn) -> tuple[bytes, bytes, list[int]]:
    """(original, expected after rewriting, chunk cut points)."""
    nl = draw(hs.sampled_from(["\n", "\r\n", "\r"]))
    before = draw(hs.integers(0, 3))
    events: list[tuple[str, str]] = []
    for _ in range(before):
        lines = draw(hs.lists(hs.one_of(
            hs.builds(lambda v: f"data: {v}", field_text),
            hs.builds(lambda v: f"event: {v}", hs.sampled_from(["message", "ping", "x"])),
            hs.builds(lambda v: f": {v}", field_text),
            hs.builds(lambda v: f"id: {v}", field_text),
        ), min_size=1, max_size=4))
        text = nl.join(lines) + nl + nl
        events.append((text, text))
    rest = draw(url_rest)
    extra = draw(hs.lists(hs.sampled_from(["id: 1", ": c", "retry: 10"]), max_size=2))
    head = nl.join(["event: endpoint", *extra])
    events.append((f"{head}{nl}data: https://mcp.example:8443{rest}{nl}{nl}",
                   f"{head}{nl}data: {PROXY}{rest}{nl}{nl}"))
    after = draw(hs.lists(field_text, max_size=4))
    for value in after:
        text = f"data: {value}{nl}{nl}"
        events.append((text, text))
    original = "".join(o for o, _ in events).encode()
    expected = "".join(e for _, e in events).encode()
    cuts = sorted(draw(hs.lists(hs.integers(0, len(original)), max_size=8)))
    return original, expected, cuts


@settings(max_examples=150, deadline=None)
@given(case=streams())
def test_a_rewritten_stream_differs_only_in_the_endpoint_url(
    case: tuple[bytes, bytes, list[int]]
) -> None:
    """However the stream is chunked, the rewrite changes the endpoint URL and nothing else."""
    original, expected, cuts = case
    bounds = [0, *cuts, len(original)]
    chunks = [original[a:b] for a, b in itertools.pairwise(bounds)]
    rewriter = EndpointRewriter(TARGET, PROXY)
    out = b"".join(rewriter.feed(c) for c in chunks) + rewriter.flush()
    assert out == expected


@settings(max_examples=300, deadline=None)
@given(data=hs.binary(max_size=300), cuts=hs.lists(hs.integers(0, 300), max_size=6))
def test_a_stream_without_a_target_endpoint_passes_unchanged(
    data: bytes, cuts: list[int]
) -> None:
    """Arbitrary bytes with no endpoint on the target's origin come out exactly as they went in."""
    if b"mcp.example" in data:
        return
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    rewriter = EndpointRewriter(TARGET, PROXY)
    out = b"".join(rewriter.feed(c) for c in chunks) + rewriter.flush()
    assert out == data


def test_a_cr_terminated_endpoint_event_is_rewritten_without_waiting_for_more() -> None:
    """A server using bare CR line ends gets its endpoint event to the client at once."""
    rewriter = EndpointRewriter(TARGET, PROXY)
    out = rewriter.feed(b"event: endpoint\rdata: https://mcp.example:8443/m?s=1\r\r")
    assert out == b"event: endpoint\rdata: " + PROXY.encode() + b"/m?s=1\r\r"
    assert rewriter.feed(b"\n: later\r\n") == b"\n: later\r\n"


def test_a_crlf_split_after_its_cr_does_not_count_as_an_extra_event() -> None:
    """A CRLF cut between CR and LF ends one event, not two: the endpoint event is still found."""
    rewriter = EndpointRewriter(TARGET, PROXY)
    out = rewriter.feed(b"data: a\r\n\r")
    out += rewriter.feed(b"\nevent: endpoint\r\ndata: https://mcp.example:8443/m\r\n\r\n")
    assert out == (b"data: a\r\n\r\nevent: endpoint\r\ndata: " + PROXY.encode()
                   + b"/m\r\n\r\n")


def test_an_endpoint_url_keeps_an_empty_query_or_fragment_byte_for_byte() -> None:
    """Only the origin of the endpoint URL changes, even where a URL parser would normalise."""
    from proxy.forwarding.sse import rewrite_endpoint_url

    for rest in ("/?", "/m#", "/m?#", "/a%2fb?x=%20"):
        assert rewrite_endpoint_url(f"https://mcp.example:8443{rest}", TARGET, PROXY) == (
            PROXY + rest)
