"""Size limits under attack: oversized bodies get 413, header bombs 400/431, never a crash."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from aiohttp import web

from proxy import AuthProxy

from .conftest import AuthProxyFactory, LeakWatch, Recorder, ServeMcp
from .raw import RawAnswer, exchange, get_ok, parse, read_until_closed, request
from helpers import WAIT, eventually

LIMIT = 64 * 1024


class CountingUpstream:
    """Counts the request-body bytes that actually reached the target."""

    def __init__(self) -> None:
        self.received = 0
        self.requests = 0

    async def handler(self, request: web.Request) -> web.Response:
        self.requests += 1
        if request.method == "GET":
            return web.Response(text="ok")
        with contextlib.suppress(Exception):
            async for chunk in request.content.iter_any():
                self.received += len(chunk)
        return web.Response(text="read")


@pytest.fixture
async def counting(serve_mcp: ServeMcp) -> tuple[CountingUpstream, str]:
    upstream = CountingUpstream()
    return upstream, await serve_mcp(upstream.handler)


@pytest.fixture
async def limited(make_authproxy: AuthProxyFactory, counting: tuple[CountingUpstream, str]
                  ) -> tuple[CountingUpstream, AuthProxy]:
    """A proxy that takes request bodies up to LIMIT, in front of a `CountingUpstream`."""
    upstream, url = counting
    proxy: AuthProxy = await make_authproxy(url, max_request_bytes=LIMIT)
    return upstream, proxy


async def test_a_declared_oversized_body_gets_413_before_anything_is_sent(
    limited: tuple[CountingUpstream, AuthProxy]
) -> None:
    """A client announcing a body above the limit is refused at once; the target sees nothing."""
    upstream, proxy = limited
    # Only the head is sent: the answer must not wait for a body that never comes.
    raw = (b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           b"Content-Length: 1000000000\r\n\r\n")
    answer = parse(await exchange(proxy.port, raw))
    assert answer is not None
    assert answer.status == 413
    assert answer.json()["error"] == "payload_too_large"
    assert upstream.requests == 0
    await get_ok(proxy.port)


async def test_a_body_at_the_limit_is_forwarded_whole(
    limited: tuple[CountingUpstream, AuthProxy]
) -> None:
    """The limit is inclusive: a body of exactly max_request_bytes reaches the target."""
    upstream, proxy = limited
    answer = await request(proxy.port, ["Host: 127.0.0.1"], body=b"x" * LIMIT, method="POST")
    assert answer is not None and answer.status == 200
    assert upstream.received == LIMIT


@pytest.mark.parametrize("keep_sending", [False, True])
async def test_an_oversized_chunked_body_is_cut_off_and_never_reaches_the_target_whole(
    limited: tuple[CountingUpstream, AuthProxy], keep_sending: bool
) -> None:
    """A chunked upload over the limit gets 413 or a closed connection, never forwarded whole."""
    upstream, proxy = limited
    total = 16 * LIMIT
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    sent = 0
    try:
        writer.write(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"y" * 8192
        with contextlib.suppress(ConnectionError):
            while sent < total:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await asyncio.wait_for(writer.drain(), WAIT)
                sent += len(chunk)
                if not keep_sending and sent > 2 * LIMIT:
                    break
            if sent >= total:
                writer.write(b"0\r\n\r\n")
                await asyncio.wait_for(writer.drain(), WAIT)
        raw = await asyncio.wait_for(read_until_closed(reader), WAIT)
    finally:
        writer.close()
    answer = parse(raw)
    assert answer is None or answer.status == 413
    assert upstream.received < total
    assert upstream.received <= LIMIT + 65536  # at most the limit plus one read in flight
    await get_ok(proxy.port)


@pytest.mark.parametrize("bomb", [
    pytest.param([f"X-Huge: {'a' * 200_000}"], id="one-huge-header"),
    pytest.param([f"X-Many-{i}: v" for i in range(5000)], id="many-headers"),
    pytest.param([f"X-Wide-{i}: {'b' * 60_000}" for i in range(200)], id="many-wide-headers"),
    pytest.param(["X-Fold: a", " folded continuation"], id="obsolete-line-folding"),
    pytest.param(["Bad Header Name: x"], id="space-in-name"),
    pytest.param(["X-Nul: a\x00b"], id="nul-in-value"),
])
async def test_header_bombs_get_400_or_431_and_the_proxy_keeps_serving(
    proxy: AuthProxy, recorder: Recorder, bomb: list[str]
) -> None:
    """Absurd request headers get a clear client error, never a crash or a forwarded request."""
    answer = await request(proxy.port, ["Host: 127.0.0.1", *bomb])
    assert answer is None or answer.status in (400, 431), answer.head
    assert recorder.seen == []
    await get_ok(proxy.port)


@pytest.mark.parametrize("target", [
    "/" + "p" * 200_000,
    "/mcp?" + "q=1&" * 50_000,
])
async def test_an_oversized_request_line_gets_a_client_error(
    proxy: AuthProxy, recorder: Recorder, target: str
) -> None:
    """A request line too long to be real is refused with 400/414/431, and nothing is forwarded."""
    answer = await request(proxy.port, ["Host: 127.0.0.1"], target=target)
    assert answer is None or answer.status in (400, 414, 431), answer.head
    assert recorder.seen == []
    await get_ok(proxy.port)


@pytest.mark.parametrize("line", [
    b"GARBAGE\r\n\r\n",
    b"GET /mcp HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET  HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS hello
    b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # a classic smuggling pair
    b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
async def test_malformed_requests_get_a_client_error(
    proxy: AuthProxy, recorder: Recorder, line: bytes
) -> None:
    """Bytes that are not one clear HTTP/1.1 request are refused, not guessed at."""
    answer = parse(await exchange(proxy.port, line))
    assert answer is None or 400 <= answer.status < 500, answer.head
    assert recorder.seen == []
    await get_ok(proxy.port)


async def answered(port: int, status: int) -> RawAnswer | None:
    """The answer to a plain GET when it has `status`, else None (for `eventually`)."""
    answer = await request(port, ["Host: 127.0.0.1"])
    return answer if answer is not None and answer.status == status else None


async def test_connections_above_the_cap_get_503_with_a_json_body(
    make_authproxy: AuthProxyFactory, recorder: Recorder
) -> None:
    """Past the connection cap a client gets a plain 503, and room comes back when others leave."""
    proxy = await make_authproxy(recorder.url, max_connections=3)
    held = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(3)]
    try:
        # The held connections must be counted before the next one arrives.
        answer = await eventually(lambda: answered(proxy.port, 503))
        assert answer.json()["error"] == "service_unavailable"
        assert b"Retry-After" in answer.head
        assert recorder.seen == []
    finally:
        for _, writer in held:
            writer.close()
    await eventually(lambda: answered(proxy.port, 200))


def test_the_connection_cap_fits_the_descriptor_limit() -> None:
    """A cap above what the fd limit allows is lowered so it, not accept(), says no."""
    from proxy.forwarding.listener import FD_RESERVE, fitting_connection_cap

    assert fitting_connection_cap(4096, 1024) == (1024 - FD_RESERVE) // 2
    assert fitting_connection_cap(4096, 1_048_576) == 4096
    assert fitting_connection_cap(4096, 10) == 1


def _low_fd_limit() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))


async def test_under_a_low_fd_limit_excess_clients_get_503_not_a_hang(
    recorder: Recorder, tmp_path: Path, leak_watch: LeakWatch
) -> None:
    """With `ulimit -n 128` the proxy still answers clients above its (lowered) cap with 503."""
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--target-url", recorder.url,
        "--state-dir", str(tmp_path / "state"), "--health-interval", "0",
        "--log-format", "json",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, preexec_fn=_low_fd_limit,
    )
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        assert proc.stdout is not None and proc.stderr is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(40)]
        answer = await request(port, ["Host: 127.0.0.1"])
        assert answer is not None and answer.status == 503
        assert answer.json()["error"] == "service_unavailable"
        for _, writer in held:
            writer.close()
        held = []
        await eventually(lambda: answered(port, 200))
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        leak_watch.texts.append(err.decode())
        assert b"connection_cap_lowered" in err
        assert proc.returncode == 0
    finally:
        for _, writer in held:
            writer.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_expect_100_continue_with_an_oversized_body_gets_413_not_continue(
    limited: tuple[CountingUpstream, AuthProxy]
) -> None:
    """A client asking before sending a huge body is told no at once, never invited to send."""
    upstream, proxy = limited
    raw = (b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
           b"Content-Length: %d\r\n\r\n" % (LIMIT + 1))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(raw)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 413"), head
    assert upstream.requests == 0


async def test_many_small_chunks_add_up_to_the_limit(
    make_authproxy: AuthProxyFactory, counting: tuple[CountingUpstream, str]
) -> None:
    """The limit counts body bytes, however finely the client chunks them."""
    upstream, url = counting
    proxy = await make_authproxy(url, max_request_bytes=1024)
    chunks = b"".join(b"1\r\nx\r\n" for _ in range(2048)) + b"0\r\n\r\n"
    raw = (b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
           b"Connection: close\r\n\r\n" + chunks)
    answer = parse(await exchange(proxy.port, raw))
    assert answer is None or answer.status == 413
    assert upstream.received <= 1024 + 64


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ([b"X-Big: " + b"a" * 70_000], 431),
        ([b"X-%d: 1" % i for i in range(300)], 431),
        ([b"Bad Header Name: 1"], 400),
    ],
)
async def test_malformed_requests_get_a_json_answer_that_quotes_nothing_back(
    make_authproxy: AuthProxyFactory, counting: tuple[CountingUpstream, str], extra: list[bytes],
    status: int,
) -> None:
    """Oversized or malformed headers get a short JSON 431/400 that never echoes the
    request's bytes (an Authorization value among them) back."""
    _, url = counting
    proxy = await make_authproxy(url)
    head = b"\r\n".join([b"GET /mcp HTTP/1.1", b"Host: 127.0.0.1",
                         b"Authorization: Bearer client-secret-value", *extra])
    answer = parse(await exchange(proxy.port, head + b"\r\n\r\n"))
    assert answer is not None and answer.status == status
    assert answer.json()["error"] in ("request_header_fields_too_large", "bad_request")
    assert b"client-secret-value" not in answer.body and b"aaaa" not in answer.body
