"""The proxy's upstream connections: a lean keep-alive pool, the `ClientSession` behind it,
and the TLS context both verify targets with.

The session is transparent: it adds no headers of its own (no Accept, Accept-Encoding,
User-Agent or Content-Type), never decompresses, never stores cookies between clients
and never follows redirects by itself (the forwarding handler decides, so a credential
never leaves the target's origin). `UpstreamPool` sends requests whose body is already in
memory without the session's machinery, one write each; it connects only to the target's
origin. Neither must ever disable certificate verification.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp
from aiohttp import hdrs
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import set_exception
from aiohttp.http import RawResponseMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpResponseParser
from aiohttp.http_writer import _serialize_headers
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from ..config import ProxyConfig
from ..tls import client_context
from .limits import MAX_HEADER_LINE

# Headers aiohttp would otherwise invent; a client that sent them still has them forwarded.
SKIP_AUTO_HEADERS = (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE)


def make_session(config: ProxyConfig) -> aiohttp.ClientSession:
    """The shared upstream session; must be created inside the running loop."""
    connector = aiohttp.TCPConnector(
        # A held SSE stream keeps its connection for its lifetime: never queue the 101st.
        limit=0,
        limit_per_host=0,
        keepalive_timeout=config.upstream_idle_timeout,
        ssl=client_context(config.ca_file),
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=SKIP_AUTO_HEADERS,
        cookie_jar=aiohttp.DummyCookieJar(),
        # Time limits are the handler's: response_timeout for headers, none for a stream.
        timeout=aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=None),
        trust_env=False,
        raise_for_status=False,
        # The target's header sizes are the client's business, not ours to cap at 8 KiB.
        max_line_size=MAX_HEADER_LINE,
        max_field_size=MAX_HEADER_LINE,
    )


# --- the lean pool --------------------------------------------------------------------
#
# aiohttp's ClientSession does much per request that a proxy does not need (building a
# ClientRequest, payload objects, a writer task for every body on Python 3.11, tracing
# hooks). The forwarding path only ever sends one already-built
# request to one origin, so for requests whose body is already in memory (or absent) it
# writes the request itself, in one `transport.write`, on a lean connection protocol
# (`_Connection`, aiohttp's C response parser kept for the connection's life) from a pool.
# Streamed uploads keep using the session.

_IDEMPOTENT = frozenset({hdrs.METH_GET, hdrs.METH_HEAD, hdrs.METH_OPTIONS, hdrs.METH_TRACE,
                         hdrs.METH_PUT, hdrs.METH_DELETE})
# Methods for which an absent body goes without `Content-Length: 0` (as aiohttp does).
_NO_BODY_METHODS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD, hdrs.METH_OPTIONS,
                              hdrs.METH_TRACE})
READ_BUFSIZE = 2**16
# Bytes of a response kept (references, no copies) in case its relay diverts the
# connection: above what the parser takes in before the relay starts (its reader pauses
# at 128 KiB, a read is up to 256 KiB), so a bulk body can be diverted too.
RECORD_LIMIT = 2**19
_EMPTY_BODY = frozenset({204, 304})
MAX_IDLE = 1024  # idle keep-alive connections kept (Go's anchor keeps 1,024 too)


EarlyAnswer = Callable[[RawResponseMessage, StreamReader], None]


class Upstream(Protocol):
    """A target's response as the forwarding handler uses it (ClientResponse fits)."""

    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def content(self) -> StreamReader: ...
    def release(self) -> Any: ...
    def close(self) -> None: ...


def request_head(method: str, path_qs: str, host: str, headers: CIMultiDict[str],
                 body: bytes | None) -> bytes:
    """The request line and headers as sent: `Host` first, then `headers` in order.

    `Content-Length` is set for an in-memory body the way aiohttp's client does. Raises
    ValueError on a CR, LF or NUL anywhere (aiohttp's C serializer checks), so nothing can
    smuggle a second request in a header value.
    """
    if body is not None:
        if hdrs.CONTENT_LENGTH not in headers:
            headers[hdrs.CONTENT_LENGTH] = str(len(body))
    elif method not in _NO_BODY_METHODS and hdrs.CONTENT_LENGTH not in headers:
        headers[hdrs.CONTENT_LENGTH] = "0"
    line = f"{method} {path_qs} HTTP/1.1"
    serialized: bytes = _serialize_headers(line, headers)
    # Splice Host in after the request line; validated through the same serializer.
    host_line: bytes = _serialize_headers("Host: " + host, _NO_HEADERS)[:-4]
    cut = len(line.encode("utf-8"))
    return serialized[:cut] + b"\r\n" + host_line + serialized[cut:]


_NO_HEADERS: CIMultiDict[str] = CIMultiDict()


class RawSink(Protocol):
    """Takes a connection's bytes in place of aiohttp's parser (see `LeanResponse.divert`)."""

    def feed(self, data: bytes) -> None: ...
    def lost(self, exc: BaseException | None) -> None: ...


class LeanResponse:
    """The target's response on a pooled connection; `release()` or `close()` it."""

    __slots__ = ("_chunked", "_pool", "_proto", "content", "headers", "reason", "status")

    def __init__(self, pool: UpstreamPool, proto: _Connection,
                 message: RawResponseMessage, payload: StreamReader) -> None:
        self._pool = pool
        self._proto: _Connection | None = proto
        self.status: int = message.code
        self.reason: str | None = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content: StreamReader = payload
        self._chunked = bool(message.chunked)

    @property
    def chunked(self) -> bool:
        """The body comes with chunked framing."""
        return self._chunked

    @property
    def transport(self) -> asyncio.Transport | None:
        proto = self._proto
        return proto.transport if proto is not None else None

    def received(self) -> bytes | None:
        """Every byte of this response received so far (head included), when it was kept:
        only for a chunked body on a connection that has not kept more than RECORD_LIMIT."""
        proto = self._proto
        if not (self._chunked and isinstance(proto, _Connection)) or proto.record is None:
            return None
        return b"".join(proto.record)

    def divert(self, sink: RawSink | None) -> None:
        """From now on the connection's bytes go to `sink`, not to aiohttp's parser; the
        connection can only be closed, unless `undivert()` hands it back. None stops the
        diversion."""
        proto = self._proto
        if isinstance(proto, _Connection):
            proto.record = None
            proto.sink = sink

    def undivert(self) -> None:
        """The diverted body ended cleanly on a message boundary: hand the connection back
        to its protocol, its body marked ended, so `release()` can pool it (the next
        request gets a fresh parser)."""
        proto = self._proto
        if isinstance(proto, _Connection) and proto.sink is not None:
            proto.sink = None
            self.content.feed_eof()
            proto.parser_bypassed()

    def forget(self) -> None:
        """Stop keeping the bytes received (the relay will not `divert`)."""
        proto = self._proto
        if isinstance(proto, _Connection):
            proto.record = None

    def listen(self, listener: Callable[[], None] | None) -> bool:
        """Call `listener` right after each piece of the body arrives (and on a lost
        connection), from the protocol callback, so a relay can pass it on without a task
        switch per event. False when this connection cannot (it is already released)."""
        proto = self._proto
        if not isinstance(proto, _Connection):
            return False
        proto.listener = listener
        return True

    def release(self) -> None:
        """Back to the pool when the body was read to its end, else closed."""
        proto, self._proto = self._proto, None
        if proto is not None:
            if isinstance(proto, _Connection):
                proto.listener = None
                proto.record = None
                if proto.sink is not None:  # its parser was bypassed: not reusable
                    proto.sink = None
                    proto.close()
                    return
            self._pool.put(proto)

    def close(self) -> None:
        """Close the connection now (a cancelled stream frees the target's side at once)."""
        proto, self._proto = self._proto, None
        if proto is not None:
            if isinstance(proto, _Connection):
                proto.listener = None
                proto.record = None
                proto.sink = None
            proto.close()


class _Connection(BaseProtocol):
    """One pooled connection to the target: aiohttp's C response parser, nothing more.

    aiohttp's `_Connection` is a message queue with read timeouts, WebSocket
    hand-over and a fresh parser per request; the pool needs none of that (the handler
    keeps the one response timeout). The parser lives as long as the connection and
    parses response after response; it is made anew only for a HEAD (whose answer has no
    body) and after a diverted body, whose bytes it never saw.
    """

    __slots__ = ("_exception", "_fresh", "_payload", "_pending", "_should_close",
                 "_skip_payload", "_waiter", "early", "listener", "record", "recorded",
                 "sink")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._skip_payload = False
        self._fresh = True  # the next response needs a new parser
        self._pending: deque[tuple[RawResponseMessage, StreamReader]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._exception: BaseException | None = None
        self._payload: StreamReader | None = None
        self._should_close = False
        # Set while a relay pushes this connection's body on as it arrives (see `listen`).
        self.listener: Callable[[], None] | None = None
        # Offered the final answer from the socket callback before the waiting task
        # resumes (see `UpstreamPool.request`); cleared once offered.
        self.early: EarlyAnswer | None = None
        # The bytes of the current response as received, kept (up to RECORD_LIMIT) until
        # the relay decides whether to `divert` them; None when not kept.
        self.record: list[bytes] | None = None
        self.recorded = 0
        # Takes every byte in place of the parser once diverted.
        self.sink: RawSink | None = None

    @property
    def should_close(self) -> bool:
        """Not reusable: the target said so, or a body, message or error is left over."""
        payload = self._payload
        return (self._should_close or self._upgraded or self._exception is not None
                or bool(self._pending) or (payload is not None and not payload.is_eof()))

    def is_connected(self) -> bool:
        transport = self.transport
        return transport is not None and not transport.is_closing()

    def close(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.close()
            self.transport = None
            self._payload = None

    def expect_response(self, *, head: bool) -> None:
        """Get ready for the answer to the request about to be written."""
        if self._fresh or self._parser is None or head != self._skip_payload:
            self._parser = HttpResponseParser(
                self, self._loop, READ_BUFSIZE, payload_exception=aiohttp.ClientPayloadError,
                response_with_body=not head, read_until_eof=False, auto_decompress=False,
                max_line_size=MAX_HEADER_LINE, max_field_size=MAX_HEADER_LINE,
            )
            self._skip_payload = head
            self._fresh = False
        self.record = []
        self.recorded = 0

    def parser_bypassed(self) -> None:
        """A diverted body ended: the parser did not see it, the next response needs a new one."""
        self._fresh = True
        self._payload = None

    async def read(self) -> tuple[RawResponseMessage, StreamReader]:
        """The next response's head and body stream."""
        pending = self._pending
        while not pending:
            if self._exception is not None:
                raise self._exception
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return pending.popleft()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._should_close = True
        if self._exception is None:
            self._exception = exc
        self._wake()

    def resume_reading(self, resume_parser: bool = True) -> None:
        # aiohttp's readers call this after every read, paused or not; each call would
        # feed the parser an empty chunk. A parser that was not paused holds nothing.
        if self._reading_paused or self._buffer_paused:
            super().resume_reading(resume_parser)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.feed(data)
            return
        record = self.record
        if record is not None:
            self.recorded += len(data)
            if self.recorded <= RECORD_LIMIT:
                record.append(data)
            else:
                self.record = None
        parser = self._parser
        if parser is None:
            self._should_close = True  # bytes nobody asked for: never reuse this one
            return
        try:
            messages, upgraded, _tail = parser.feed_data(data)
        except Exception as exc:
            if self.transport is not None:
                self.transport.close()
            self._fail(HttpProcessingError(code=exc.code, message=exc.message)
                       if isinstance(exc, HttpProcessingError) else HttpProcessingError())
            return
        if upgraded:
            self._upgraded = True
        if messages:
            for message, payload in messages:
                if message.should_close:
                    self._should_close = True
                self._payload = payload
                if self._skip_payload or message.code in _EMPTY_BODY:
                    payload = EMPTY_PAYLOAD
                self._pending.append((message, payload))
                early = self.early
                if early is not None and not 100 <= message.code <= 199:
                    self.early = None
                    early(message, payload)
            self._wake()
        if self.listener is not None:
            self.listener()

    def eof_received(self) -> None:
        return None  # the transport closes; connection_lost ends the body or fails it

    def connection_lost(self, exc: BaseException | None) -> None:
        uncompleted = None
        parser = self._parser
        if parser is not None:
            try:
                uncompleted = parser.feed_eof()
            except Exception as underlying:
                if self._payload is not None:
                    set_exception(self._payload, aiohttp.ClientPayloadError(
                        f"Response payload is not completed: {underlying!r}"), underlying)
        if isinstance(exc, OSError):
            error: BaseException = aiohttp.ClientOSError(*exc.args)
        elif exc is None:
            error = aiohttp.ServerDisconnectedError(uncompleted)
        else:
            error = exc
        self._fail(error)
        self._parser = None
        self._payload = None
        self._reading_paused = False
        self._buffer_paused = False
        super().connection_lost(error)
        if self.sink is not None:
            self.sink.lost(exc)
        if self.listener is not None:
            self.listener()  # it finds the payload's error (or its end) and stops


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to the one target origin; idle ones are bounded."""

    def __init__(self, config: ProxyConfig, ssl_context: ssl.SSLContext | None = None) -> None:
        target = config.target
        self._loop = asyncio.get_running_loop()
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

    def _new_protocol(self) -> _Connection:
        return _Connection(self._loop)

    async def _connect(self) -> _Connection:
        _, proto = await self._loop.create_connection(
            self._new_protocol, self._host, self._port, ssl=self._ssl,
            server_hostname=self._server_hostname,
        )
        return proto

    def _take(self) -> _Connection | None:
        while self._idle:
            proto, _ = self._idle.pop()  # the most recent: least likely to be closing
            if proto.is_connected() and not proto.should_close:
                return proto
            proto.close()
        return None

    def put(self, proto: _Connection) -> None:
        """Keep a connection whose response ended cleanly; close anything else."""
        if self._closed or proto.should_close or not proto.is_connected():
            proto.close()
            return
        if len(self._idle) >= MAX_IDLE:
            old, _ = self._idle.popleft()
            old.close()
        self._idle.append((proto, self._loop.time()))
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self._idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle longer than `upstream_idle_timeout`."""
        self._sweeper = None
        deadline = self._loop.time() - self._idle_timeout
        idle = self._idle
        while idle and idle[0][1] <= deadline:
            idle.popleft()[0].close()
        if idle:
            self._sweeper = self._loop.call_at(idle[0][1] + self._idle_timeout, self._sweep)

    async def request(self, method: str, path_qs: str, headers: CIMultiDict[str],
                      body: bytes | None, early: EarlyAnswer | None = None) -> LeanResponse:
        """Send one request and wait for its response headers.

        A kept-alive connection the target closed meanwhile is retried once on a new one
        for idempotent methods (as aiohttp's client does); other errors propagate as
        aiohttp.ClientError or OSError. `early` is offered the final answer from the
        socket callback, before this coroutine resumes (it must not raise).
        """
        if self._closed:
            raise aiohttp.ClientConnectionError("the upstream pool is closed")
        head = request_head(method, path_qs, self.host_header, headers, body)
        data = head + body if body else head
        retry = method in _IDEMPOTENT
        head_only = method == hdrs.METH_HEAD
        while True:
            proto = self._take()
            reused = proto is not None
            if proto is None:
                proto = await self._connect()
            # One coroutine for the round trip (not one per step): it runs per request.
            try:
                transport = proto.transport
                if transport is None:
                    raise aiohttp.ServerDisconnectedError()
                proto.expect_response(head=head_only)
                proto.early = early
                transport.write(data)
                while True:
                    try:
                        message, payload = await proto.read()
                    except HttpProcessingError as exc:
                        raise aiohttp.ClientConnectionError(
                            f"malformed response from the target ({exc.message})") from None
                    # 1xx interim answers (but 101) are not the response: read on.
                    if not 100 <= message.code <= 199 or message.code == 101:
                        return LeanResponse(self, proto, message, payload)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                proto.close()
                if not (reused and retry):
                    raise
                retry = False
            except BaseException:
                proto.close()
                raise
            finally:
                proto.early = None

    async def close(self) -> None:
        """Close every idle connection; busy ones close when their responses end."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._idle:
            self._idle.popleft()[0].close()
