"""The proxy's upstream connections: a lean keep-alive pool on httptools' response parser.

`UpstreamPool` connects only to the target's origin and sends one request per connection
at a time: the head in one write with a body already in memory, or the head and then a
streamed body (its length as the client gave it, else chunked) paced by the target's
reading. Responses are parsed by llhttp (strict framing, chunked decoding); the body
arrives in `UpstreamResponse`, buffered until a relay takes it over (`attach`), and a
relay that falls behind pauses reading from the target. A body that ends with the
connection (no length, not chunked) ends cleanly at that close (RFC 9112 §6.3). It adds
no header of its own but `Host` and a framing header, never decompresses, never follows
redirects (the forwarding handler decides), never reaches into a library's private state,
and must never disable certificate verification.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from ..config import ProxyConfig
from ..tls import client_context
from .chunked import LAST_CHUNK, chunk
from .head import serialize_head
from .limits import MAX_HEAD_BYTES


class UpstreamError(Exception):
    """The target could not be reached, or answered with something that is not HTTP/1.1."""


class UpstreamClosed(UpstreamError, ConnectionError):
    """The target closed the connection before (the rest of) its response."""


class BadResponse(UpstreamError):
    """The target's response head or framing is malformed, or its head above 64 KiB."""


class _HeadDone(Exception):
    """Stops the parser after the head of an answer to HEAD."""


_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods for which an absent body goes without `Content-Length: 0` (as clients do).
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Response body bytes buffered (no relay attached yet, or the awaited loop behind)
# before reading from the target pauses.
BUFFER_HIGH_WATER = 2**16
# Upload bytes the target has not taken yet before the upload waits for it.
WRITE_HIGH_WATER = 2**16
MAX_IDLE = 1024  # idle keep-alive connections kept (Go's anchor keeps 1,024 too)


def request_head(method: str, path_qs: str, host: str, headers: CIMultiDict[str],
                 body: bytes | None, streamed: bool = False) -> bytes:
    """The request line and headers as sent: `Host` first, then `headers` in order.

    `Content-Length` is set for an in-memory body; a streamed body without one is sent
    chunked. Raises ValueError on a CR, LF or other control character anywhere, so
    nothing can smuggle a second request in a header value.
    """
    fields = [("Host", host), *headers.items()]
    if "Content-Length" not in headers:  # `headers` is left as it is: a replay reuses it
        if streamed:
            fields.append(("Transfer-Encoding", "chunked"))
        elif body is not None:
            fields.append(("Content-Length", str(len(body))))
        elif method not in _NO_BODY_METHODS:
            fields.append(("Content-Length", "0"))
    return serialize_head(f"{method} {path_qs} HTTP/1.1", fields)


class BodySink(Protocol):
    """Takes a response body as it arrives, from the socket callback (a pushed relay)."""

    def body(self, pieces: list[bytes]) -> None: ...
    def end(self) -> None: ...
    def fail(self, exc: BaseException) -> None: ...


class UpstreamResponse:
    """The target's response on a pooled connection; `release()` or `close()` it.

    Its body is buffered until `attach` (a sink takes it from the socket callback) or
    read with `read()` (the awaited loop); `complete` once every byte arrived.
    """

    __slots__ = ("_buffer", "_conn", "_headers", "_pool", "_size", "_waiter", "complete",
                 "error", "fields", "reason", "received", "sink", "status", "version")

    def __init__(self, pool: UpstreamPool, conn: _Connection, status: int, reason: str,
                 version: str, fields: list[tuple[str, str]]) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status = status
        self.reason = reason
        self.version = version
        self.fields = fields  # the head's fields in order, latin-1 text: what was sent
        self._headers: CIMultiDictProxy[str] | None = None
        self.complete = False
        self.error: BaseException | None = None
        self.sink: BodySink | None = None
        self.received = 0  # body bytes received
        self._buffer: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The fields as a multidict, made when first asked for: a whole answer sent from
        the socket callback is written from `fields` and needs none before it is out."""
        headers = self._headers
        if headers is None:
            headers = self._headers = CIMultiDictProxy(CIMultiDict(self.fields))
        return headers

    def header(self, name: str) -> str | None:
        """The first value of field `name` (any case), without making the multidict."""
        low = name.lower()
        for field, value in self.fields:
            if field.lower() == low:
                return value
        return None

    @property
    def finished(self) -> bool:
        """The whole body arrived, cleanly."""
        return self.complete and self.error is None

    # --- from the connection ------------------------------------------------------------

    def _feed(self, pieces: list[bytes]) -> None:
        size = len(pieces[0]) if len(pieces) == 1 else sum(map(len, pieces))
        self.received += size
        sink = self.sink
        if sink is not None:
            sink.body(pieces)
            return
        self._buffer.extend(pieces)
        self._size += size
        if self._size > BUFFER_HIGH_WATER:
            self.pause()
        self._wake()

    def _end(self) -> None:
        self.complete = True
        sink = self.sink
        if sink is not None:
            sink.end()
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self.complete or self.error is not None:
            return
        self.error = exc
        sink = self.sink
        if sink is not None:
            sink.fail(exc)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- for the relay ------------------------------------------------------------------

    def take(self) -> bytes:
        """The body bytes buffered so far (reading from the target resumes)."""
        buffer = self._buffer
        if not buffer:
            return b""
        data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self._size = 0
        self.resume()
        return data

    def attach(self, sink: BodySink) -> bytes:
        """From now on the body goes to `sink` from the socket callback; returns what was
        buffered before (for the caller to send first). The end or failure is reported to
        the sink when it comes after this; check `complete` and `error` for before."""
        data = self.take()
        self.sink = sink
        return data

    async def read(self) -> bytes:
        """The next body bytes, b"" at the end; raises UpstreamClosed when it broke off."""
        while not self._buffer:
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            self.resume()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.take()

    def pause(self) -> None:
        """Stop reading from the target (the client fell behind)."""
        conn = self._conn
        if conn is not None:
            conn.pause()

    def resume(self) -> None:
        conn = self._conn
        if conn is not None:
            conn.resume()

    def release(self) -> None:
        """Back to the pool when the body was read to its end, else closed."""
        conn, self._conn = self._conn, None
        self.sink = None
        if conn is not None:
            if self.finished:
                self._pool.put(conn)
            else:
                conn.close()

    def close(self) -> None:
        """Close the connection now (a cancelled stream frees the target's side at once)."""
        conn, self._conn = self._conn, None
        self.sink = None
        if conn is not None:
            conn.close()


EarlyAnswer = Callable[[UpstreamResponse], None]


class _Connection(asyncio.Protocol):
    """One pooled connection to the target: llhttp's response parser and nothing more.

    The parser lives as long as the connection and parses response after response.
    """

    __slots__ = (
        "_closed_by_peer",
        "_drain",
        "_early",
        "_fields",
        "_head_bytes",
        "_head_only",
        "_in_head",
        "_interim",
        "_loop",
        "_parser",
        "_paused",
        "_pieces",
        "_pool",
        "_reason",
        "_response",
        "_reusable",
        "_waiter",
        "transport",
        "upload",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._response: UpstreamResponse | None = None
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._early: EarlyAnswer | None = None
        self._head_only = False
        self._in_head = False
        self._interim = False
        self._fields: list[tuple[str, str]] = []
        self._reason = ""
        self._head_bytes = 0
        self._pieces: list[bytes] = []
        self._paused = False
        self._reusable = True
        self._closed_by_peer = False
        self._drain: asyncio.Future[None] | None = None
        self.upload: asyncio.Task[None] | None = None  # a streamed request body being sent

    # --- asyncio --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        response = self._response
        if self._waiter is None and (response is None or response.complete):
            self._reusable = False  # bytes nobody asked for: never reuse this connection
            self.close()
            return
        if self._waiter is not None:
            self._head_bytes += len(data)  # the head is not complete yet
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reusable = False
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadDone):
                self._parser = httptools.HttpResponseParser(self)
                self._deliver()
                return
            error = cause if isinstance(cause, BadResponse) else BadResponse(
                "malformed response from the target")
            self._broken(error)
            return
        if self._waiter is not None and self._head_bytes > MAX_HEAD_BYTES:
            self._broken(BadResponse("response head above 64 KiB"))
            return
        self._deliver()

    def _deliver(self) -> None:
        """Hand over what this read produced: the head (to the early answer first, then the
        waiting request), body bytes in one piece, the end."""
        response = self._response
        if response is None:
            return
        self._flush(response)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            early, self._early = self._early, None
            if early is not None:
                early(response)
            if not waiter.done():
                waiter.set_result(response)

    def _flush(self, response: UpstreamResponse) -> None:
        """The body pieces parsed from this read, together (not joined: no copy)."""
        pieces = self._pieces
        if pieces:
            self._pieces = []
            response._feed(pieces)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._reusable = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(UpstreamClosed("the target closed the connection"))
        response = self._response
        if response is not None and not response.complete and not self._in_head \
                and self._waiter is None and self._close_delimited() and exc is None:
            self._deliver()
            response._end()  # RFC 9112 §6.3: this body ends when the connection does
            return
        error = UpstreamClosed("the target closed the connection") if exc is None else \
            UpstreamClosed(f"the connection to the target failed ({type(exc).__name__})")
        self._broken(error)

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # --- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:
            raise BadResponse("bytes after the response")  # never parsed into a response
        self._in_head = True
        self._fields = []
        self._reason = ""

    def on_status(self, status: bytes) -> None:
        self._reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        parser = self._parser
        fields = self._fields
        if len(self._reason) + sum(len(n) + len(v) + 4 for n, v in fields) > MAX_HEAD_BYTES:
            raise BadResponse("response head above 64 KiB")
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True  # not the response: its end is followed by the real one
            return
        self._interim = False
        if not parser.should_keep_alive():
            self._reusable = False
        response = UpstreamResponse(self._pool, self, status, self._reason,
                                    parser.get_http_version(), fields)
        self._response = response
        if self._head_only:
            # The answer to HEAD has no body, whatever its framing headers say. llhttp
            # cannot be told so: this parser stops here, the next answer gets a new one.
            response.complete = True
            raise _HeadDone

    def on_body(self, data: bytes) -> None:
        if not self._interim:
            self._pieces.append(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        response = self._response
        if response is not None and not response.complete:
            self._flush(response)
            response._end()  # the waiting request (if any) hears of it after this read

    # --- the pool's side ---------------------------------------------------------------------

    def _close_delimited(self) -> bool:
        response = self._response
        if response is None:
            return False
        if response.status in (204, 304) or self._head_only:
            return False
        codings = response.header("Transfer-Encoding")
        if codings is not None:  # RFC 9112 §6.3: chunked last, else until the close
            return codings.rsplit(",", 1)[-1].strip().lower() != "chunked"
        return response.header("Content-Length") is None

    def _broken(self, error: BaseException) -> None:
        self._reusable = False
        self._pieces.clear()
        waiter, self._waiter = self._waiter, None
        self._early = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        response = self._response
        if response is not None:
            response._fail(error)
        self.close()

    @property
    def reusable(self) -> bool:
        response = self._response
        transport = self.transport
        return (self._reusable and transport is not None and not transport.is_closing()
                and (response is None or response.finished)
                and self.upload is None)  # a body not sent whole leaves the target mid-read

    def expect(self, head_only: bool, early: EarlyAnswer | None
               ) -> asyncio.Future[UpstreamResponse]:
        """Get ready for the answer to the request about to be written."""
        self._head_only = head_only
        self._early = early
        self._response = None
        self._interim = False
        self._waiter = waiter = self._loop.create_future()
        return waiter

    def fail_request(self, error: BaseException) -> None:
        """The request could not be sent whole (its streamed body broke): give up on it."""
        self._broken(error)

    async def drain(self) -> None:
        drain = self._drain
        if drain is not None:
            await asyncio.shield(drain)

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self._reusable = False
        upload, self.upload = self.upload, None
        if upload is not None and not upload.done():
            upload.cancel()
        transport = self.transport
        if transport is not None:
            transport.close()


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to the one target origin; idle ones are bounded."""

    def __init__(self, config: ProxyConfig, ssl_context: ssl.SSLContext | None = None) -> None:
        target = config.target
        self.loop = asyncio.get_running_loop()
        self._host = target.raw_host or ""
        self._port = target.port or (443 if target.scheme == "https" else 80)
        self.host_header = target.host_port_subcomponent or self._host
        self._ssl = (ssl_context or client_context(config.ca_file)) \
            if target.scheme == "https" else None
        self._server_hostname = target.host if self._ssl is not None else None
        self._idle_timeout = config.upstream_idle_timeout
        self._idle: deque[tuple[_Connection, float]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def _connect(self) -> _Connection:
        try:
            _, conn = await self.loop.create_connection(
                lambda: _Connection(self), self._host, self._port, ssl=self._ssl,
                server_hostname=self._server_hostname,
            )
        except OSError as exc:
            raise UpstreamError(f"cannot connect to the target ({type(exc).__name__})"
                                ) from exc
        return conn

    def _take(self) -> _Connection | None:
        while self._idle:
            conn, _ = self._idle.pop()  # the most recent: least likely to be closing
            if conn.reusable:
                return conn
            conn.close()
        return None

    def put(self, conn: _Connection) -> None:
        """Keep a connection whose response ended cleanly; close anything else."""
        if self._closed or not conn.reusable:
            conn.close()
            return
        conn.resume()  # a relay may have paused it: an idle connection must see the close
        if len(self._idle) >= MAX_IDLE:
            old, _ = self._idle.popleft()
            old.close()
        self._idle.append((conn, self.loop.time()))
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle longer than `upstream_idle_timeout`."""
        self._sweeper = None
        deadline = self.loop.time() - self._idle_timeout
        idle = self._idle
        while idle and idle[0][1] <= deadline:
            idle.popleft()[0].close()
        if idle:
            self._sweeper = self.loop.call_at(idle[0][1] + self._idle_timeout, self._sweep)

    async def request(self, method: str, path_qs: str, headers: CIMultiDict[str],
                      body: bytes | AsyncIterator[bytes] | None,
                      early: EarlyAnswer | None = None) -> UpstreamResponse:
        """Send one request and wait for its response head.

        A kept-alive connection the target closed meanwhile is retried once on a new one
        for idempotent methods whose body is in memory; other failures raise
        UpstreamError (or what broke a streamed body). `early` is offered the final
        answer from the socket callback, before this coroutine resumes (it must not raise).
        """
        if self._closed:
            raise UpstreamClosed("the upstream pool is closed")
        streamed = body is not None and not isinstance(body, bytes)
        head = request_head(method, path_qs, self.host_header, headers,
                            None if streamed else body,  # type: ignore[arg-type]
                            streamed=streamed)
        data = head + body if isinstance(body, bytes) and body else head
        chunked = streamed and "Content-Length" not in headers
        retry = method in _IDEMPOTENT and not streamed
        head_only = method == "HEAD"
        while True:
            conn = self._take()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                transport = conn.transport
                if transport is None:
                    raise UpstreamClosed("the target closed the connection")
                waiter = conn.expect(head_only, early)
                transport.write(data)
                if streamed:
                    conn.upload = self.loop.create_task(
                        _upload(conn, body, chunked))  # type: ignore[arg-type]
                return await waiter
            except UpstreamClosed:
                conn.close()
                if not (reused and retry):
                    raise
                retry = False
            except BaseException:
                conn.close()
                raise

    async def close(self) -> None:
        """Close every idle connection; busy ones close when their responses end."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._idle:
            self._idle.popleft()[0].close()


async def _upload(conn: _Connection, body: AsyncIterator[bytes], chunked: bool) -> None:
    """Send a streamed request body, at the target's pace; a broken body fails the request."""
    try:
        async for piece in body:
            transport = conn.transport
            if transport is None:
                return  # the connection is gone: the request fails there
            transport.write(chunk(piece) if chunked else piece)
            await conn.drain()
        if conn.transport is None:
            return
        if chunked:
            conn.transport.write(LAST_CHUNK)
        conn.upload = None  # sent whole: the connection may be reused
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        conn.fail_request(exc)
