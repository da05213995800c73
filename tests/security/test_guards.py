"""DNS-rebinding and cross-site guards: foreign Hosts get 421, foreign Origins 403."""

from __future__ import annotations

import pytest

from .conftest import AuthProxyFactory, Recorder
from .raw import get_ok, request

FOREIGN_ORIGINS = [
    "https://evil.example",
    "null",
    "http://localhost.evil.example",
    "http://127.0.0.1.evil.example",
    "http://localhost@evil.example",
    "http://evil.example#@localhost",
    "http://[::1].evil.example",
    "file://",
    "chrome-extension://abcdefgh",
    "",
    "https://app.example.evil",  # look-alike of an allowed origin
]


@pytest.mark.parametrize("host", [
    "attacker.example", "attacker.example:8080", "localhost.attacker.example",
    "127.0.0.1.attacker.example", "attacker.example:127.0.0.1", "",
])
async def test_a_rebinding_host_is_refused_with_421(
    make_authproxy: AuthProxyFactory, recorder: Recorder, host: str
) -> None:
    """A page that rebinds its own domain to 127.0.0.1 cannot reach the proxy."""
    proxy = await make_authproxy(recorder.url)
    answer = await request(proxy.port, [f"Host: {host}"])
    assert answer is not None
    assert answer.status == 421
    assert answer.json()["error"] == "misdirected_request"
    assert recorder.seen == []
    await get_ok(proxy.port)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:1234", "[::1]:80", "LOCALHOST",
                                  "mcp.example:99"])
async def test_loopback_and_allowed_hosts_pass(
    make_authproxy: AuthProxyFactory, recorder: Recorder, host: str
) -> None:
    """Local clients, whatever loopback name they use, and allowed hosts are served."""
    proxy = await make_authproxy(recorder.url, allowed_hosts=("mcp.example",))
    answer = await request(proxy.port, [f"Host: {host}"])
    assert answer is not None and answer.status == 200


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
async def test_a_foreign_origin_is_refused_with_403(
    make_authproxy: AuthProxyFactory, recorder: Recorder, origin: str
) -> None:
    """A web page on another site (or a sandboxed one, Origin: null) gets a JSON 403."""
    proxy = await make_authproxy(recorder.url, allowed_origins=("https://app.example",))
    answer = await request(proxy.port, ["Host: 127.0.0.1", f"Origin: {origin}"],
                           method="POST", body=b'{"jsonrpc":"2.0"}')
    assert answer is not None
    assert answer.status == 403
    assert b"application/json" in answer.head
    assert answer.json()["error"] == "forbidden_origin"
    assert recorder.seen == []
    await get_ok(proxy.port)


@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://127.0.0.1",
                                    "https://[::1]:8443", "https://app.example",
                                    "HTTPS://APP.EXAMPLE"])
async def test_loopback_and_allowed_origins_pass(
    make_authproxy: AuthProxyFactory, recorder: Recorder, origin: str
) -> None:
    """Local web apps and origins the user allowed reach the target."""
    proxy = await make_authproxy(recorder.url, allowed_origins=("https://app.example",))
    answer = await request(proxy.port, ["Host: 127.0.0.1", f"Origin: {origin}"])
    assert answer is not None and answer.status == 200
    assert len(recorder.seen) == 1


@pytest.mark.parametrize("pair", [("http://localhost", "http://localhost"),
                                  ("http://localhost", "https://evil.example")])
async def test_more_than_one_origin_is_refused(
    make_authproxy: AuthProxyFactory, recorder: Recorder, pair: tuple[str, str]
) -> None:
    """Two Origin headers are ambiguous, so the proxy refuses rather than guess."""
    proxy = await make_authproxy(recorder.url)
    answer = await request(proxy.port, ["Host: 127.0.0.1", *(f"Origin: {o}" for o in pair)])
    assert answer is not None
    assert answer.status == 403
    assert answer.json()["error"] == "forbidden_origin"
    assert recorder.seen == []


async def test_many_distinct_hostile_origins_do_not_grow_memory_or_break_answers(
    make_authproxy: AuthProxyFactory, recorder: Recorder
) -> None:
    """An attacker cycling Origin values keeps getting 403, and the verdict cache stays small."""
    proxy = await make_authproxy(recorder.url)
    for i in range(300):
        answer = await request(proxy.port, ["Host: 127.0.0.1", f"Origin: https://e{i}.example"])
        assert answer is not None and answer.status == 403
    forwarder = proxy._server._forwarder
    assert forwarder is not None
    assert len(forwarder._origin_ok) <= 256
    await get_ok(proxy.port)
