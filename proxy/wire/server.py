"""The client side of the proxy: a lean HTTP/1.1 server protocol on httptools' parser.

A reverse proxy needs little of a web framework: this keeps llhttp's strict parser
(through httptools' public callback API, as uvicorn uses it), one task per request,
pipelining in order, keep-alive, a request-header timeout (slowloris), a connection cap
(503 above it), a 64 KiB cap on the request head (431), lingering on an unread body,
JSON 400/431/501 answers for malformed input that quote nothing back, and a drain at
shutdown. Request bodies arrive in a `BodyStream` (body.py) whose reader's pace pauses
and resumes reading from the socket; the answer, a `Reply` (reply.py), is paced by the
transport's own high-water mark (`pause_writing`).
It must never block the loop, never leave a socket or task behind after `shutdown`,
never let a parse error leave a request body waiting, and never reach into another
library's private state.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from .body import EMPTY_BODY, BadRequestBody, BodyStream
from .limits import MAX_HEAD_BYTES, MAX_HEADERS
from .reply import HTTP10, HTTP11, Reply, WriteListener

# After the answer, how long a client still sending an unwanted body (a 413) is read
# and ignored before its connection is closed: closing at once would reset the
# connection and could destroy the answer before the client read it.
LINGERING_TIME = 1.0
# Pipelined requests parsed ahead of the one being served; above this the socket is not
# read until the queue drains (what one read holds is parsed: at most one buffer's worth).
MAX_QUEUED = 32
# Client-side write buffer above which the transport asks the writer to pause
# (`pause_writing`): what a client that stops reading costs the proxy at most.
WRITE_HIGH_WATER = 2**18
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_VERSIONS = {"1.1": HTTP11, "1.0": HTTP10}


def _version(text: str) -> tuple[int, int]:
    """(major, minor) of an HTTP version llhttp accepted (0.9 among them)."""
    major, _, minor = text.partition(".")
    return (int(major), int(minor)) if major.isdigit() and minor.isdigit() else (0, 9)


def error_body(code: str, message: str, **extra: Any) -> bytes:
    """The JSON body of every answer the proxy makes itself: `{"error", "message"}`."""
    return json.dumps({"error": code, "message": message, **extra}).encode()


def _fixed_answer(status: str, code: str, message: str, extra: str = "") -> bytes:
    body = error_body(code, message)
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
    return head.encode("ascii") + body


BUSY_ANSWER = _fixed_answer("503 Service Unavailable", "service_unavailable",
                            "too many connections to the proxy", "Retry-After: 1\r\n")
HEADERS_TOO_LARGE = _fixed_answer("431 Request Header Fields Too Large",
                                  "request_header_fields_too_large",
                                  "the request line or headers are too large")
BAD_REQUEST = _fixed_answer("400 Bad Request", "bad_request",
                            "the request is not valid HTTP/1.1")
NOT_IMPLEMENTED = _fixed_answer("501 Not Implemented", "not_implemented",
                                "transfer coding not supported (only chunked)")
INTERNAL_ERROR = _fixed_answer("500 Internal Server Error", "internal_error",
                               "the proxy failed to handle the request")


class _Refused(Exception):
    """A request the parser accepted but the proxy will not frame; carries the answer."""

    def __init__(self, answer: bytes, status: int, problem: str) -> None:
        super().__init__(problem)
        self.answer = answer
        self.status = status
        self.problem = problem




class InboundRequest:
    """One parsed client request: its head and its body stream."""

    __slots__ = ("content", "headers", "method", "protocol", "raw_path", "remote",
                 "should_close", "version")

    def __init__(self, protocol: ClientConnection, method: str, raw_path: str,
                 version: tuple[int, int], headers: CIMultiDictProxy[str],
                 should_close: bool, content: BodyStream) -> None:
        self.protocol = protocol
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        self.should_close = should_close
        self.content = content
        self.remote = protocol.remote

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.protocol.transport

    @property
    def host(self) -> str:
        """The Host header, else the address the client connected to."""
        host = self.headers.get("Host")
        if host:
            return host
        transport = self.protocol.transport
        sock = transport.get_extra_info("sockname") if transport is not None else None
        return f"{sock[0]}:{sock[1]}" if isinstance(sock, tuple) else "localhost"

    @property
    def body_exists(self) -> bool:
        return self.content is not EMPTY_BODY

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None else None  # the parser checked the digits

    def send_continue(self) -> None:
        """Answer `Expect: 100-continue` (the proxy takes it off the upstream request)."""
        transport = self.protocol.transport
        if transport is not None and not transport.is_closing():
            transport.write(CONTINUE)



Handler = Callable[[InboundRequest], Awaitable[Reply]]


class ClientConnection(asyncio.Protocol):
    """One client connection: parse, serve requests one at a time, keep alive or close."""

    __slots__ = (
        "_began_here",
        "_body",
        "_body_full",
        "_consumed",
        "_consumed_before",
        "_deadline",
        "_drain",
        "_error",
        "_handler",
        "_head_bytes",
        "_headers",
        "_in_head",
        "_parser",
        "_queue",
        "_reading",
        "_rejected",
        "_request",
        "_server",
        "_task",
        "_timer",
        "_url",
        "answered",
        "closing",
        "remote",
        "transport",
        "write_listener",
        "writing_paused",
    )

    def __init__(self, server: InboundServer) -> None:
        self._server = server
        self._handler = server.handler
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._queue: deque[InboundRequest] = deque()
        self._task: asyncio.Task[None] | None = None
        self._request: InboundRequest | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._rejected = False
        self._error: bytes | None = None  # a parse error's answer, due after the current one
        # The head being parsed: target, fields, bytes so far (the 64 KiB cap).
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._in_head = False
        # Where this read's bytes went (see data_received): what finished messages took.
        self._consumed = 0
        self._consumed_before = 0
        self._began_here = False
        self._body: BodyStream | None = None  # the body being received
        self._body_full = False
        self._reading = True
        self._drain: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.closing = False  # no further request on this connection
        self.answered = False  # bytes of the current request's answer went out
        self.writing_paused = False
        self.write_listener: WriteListener | None = None
        self.remote: str | None = None

    # --- the connection's life --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            self._setup(transport)
        except Exception as exc:
            self._server.connections.discard(self)
            self._server.setup_failed(exc)
            self._rejected = True
            cast(asyncio.Transport, transport).abort()

    def _setup(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        self.transport = cast(asyncio.Transport, transport)
        if len(server.connections) >= server.max_connections:
            # Over the cap: answer 503 to whatever the client sends first, then close.
            self._rejected = True
            self._arm(server.header_timeout)
            return
        server.connections.add(self)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple | list) and peer:
            self.remote = str(peer[0])
        elif isinstance(peer, str):
            self.remote = peer
        self._arm(server.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(BUSY_ANSWER)
                transport.close()
            return
        if self._error is not None or self._parser is None:
            return  # the stream is broken: nothing after the bad request is read
        self._consumed = 0
        self._began_here = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol switch through this proxy: answer the request, then close.
            self.closing = True
            self._parser = None
            self._end_body()
        except httptools.HttpParserError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refused):
                self._refuse(refused.answer, refused.status, refused.problem)
            else:
                self._refuse(BAD_REQUEST, 400, type(exc).__name__)
            return
        if self._in_head:
            # An unfinished head: llhttp holds none of it, but httptools joins a field's
            # pieces until it ends, so its bytes are bounded here, as they arrive.
            if self._began_here:
                self._head_bytes = len(data) - self._consumed_before
            else:
                self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(HEADERS_TOO_LARGE, 431, "head_too_large")
                return
        if self._queue and self._task is None:
            self._next()
        self._pace()

    # httptools callbacks: the order is begin, url, header*, headers_complete, body*,
    # message_complete; a raise inside one stops the parser (HttpParserError).

    def on_message_begin(self) -> None:
        self._in_head = True
        self._began_here = True
        self._consumed_before = self._consumed  # bytes of this read before this message
        self._head_bytes = 0
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(headers) >= MAX_HEADERS:
            raise _Refused(HEADERS_TOO_LARGE, 431, "too_many_headers")
        headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._deadline = None  # complete headers arrived
        parser = self._parser
        assert parser is not None
        method = parser.get_method()
        # The head's size as sent, give or take optional whitespace.
        size = len(method) + len(self._url) + 13 + sum(
            len(n) + len(v) + 4 for n, v in self._headers)
        self._consumed += size
        if size > MAX_HEAD_BYTES:
            raise _Refused(HEADERS_TOO_LARGE, 431, "head_too_large")
        version = _VERSIONS.get(parser.get_http_version()) or _version(
            parser.get_http_version())
        headers = CIMultiDict(self._headers)
        body: BodyStream = EMPTY_BODY
        codings = headers.getall("Transfer-Encoding", ())
        if codings:
            tokens = [t.strip().lower() for v in codings for t in v.split(",") if t.strip()]
            if any(t != "chunked" for t in tokens):
                raise _Refused(NOT_IMPLEMENTED, 501, "transfer_coding")
            if version < HTTP11:
                # RFC 9112 §6.1: chunked from an HTTP/1.0 peer is faulty framing.
                raise _Refused(BAD_REQUEST, 400, "chunked_http10")
            body = BodyStream(self)
        elif headers.get("Content-Length", "0") != "0":
            body = BodyStream(self)
        self._body = body if body is not EMPTY_BODY else None
        request = InboundRequest(
            self, method.decode("ascii"), self._url.decode("latin-1"), version,
            CIMultiDictProxy(headers), not parser.should_keep_alive(), body)
        self._queue.append(request)

    def on_body(self, data: bytes) -> None:
        self._consumed += len(data)
        body = self._body
        if body is not None:
            body.feed(data)

    def on_message_complete(self) -> None:
        self._end_body()

    def _end_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            body.feed_eof()
        self._body_full = False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._server.connections.discard(self)
        self._stop_timer()
        self.closing = True
        self._parser = None
        self.transport = None
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("the client went away"))
        if self._rejected:
            return
        gone = ConnectionResetError("the client went away")
        request = self._request
        if request is not None:
            request.content.set_exception(gone)
        for queued in self._queue:
            queued.content.set_exception(gone)
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()  # the client left: its request's work stops with it
        listener = self.write_listener
        if listener is not None:
            listener.client_resumed()  # whoever waits on the client finds it gone

    def eof_received(self) -> bool:
        return False  # a half-closed client: close our side when the transport does

    # --- flow control -----------------------------------------------------------------

    def pause_writing(self) -> None:
        self.writing_paused = True
        listener = self.write_listener
        if listener is not None:
            listener.client_paused()

    def resume_writing(self) -> None:
        self.writing_paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)
        listener = self.write_listener
        if listener is not None:
            listener.client_resumed()

    async def drain(self) -> None:
        """Wait until the client took what was written (below the high-water mark)."""
        if not self.writing_paused:
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drain)

    def body_full(self, full: bool) -> None:
        """The body reader fell behind (True) or caught up: pace reading from the client."""
        if full != self._body_full:
            self._body_full = full
            self._pace()

    def _pace(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        want = not self._body_full and len(self._queue) < MAX_QUEUED
        if want != self._reading:
            self._reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def close_after_reply(self) -> None:
        self.closing = True

    def force_close(self) -> None:
        """Drop the connection now: what was written goes out, nothing more (no clean end)."""
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def shutdown_idle(self) -> None:
        """Shutdown begins: close now if idle, else after the current answer."""
        self.closing = True
        if self._task is None and self.transport is not None:
            self.transport.close()

    async def shutdown(self, timeout: float) -> None:
        task = self._task
        if task is not None:
            await asyncio.wait([task], timeout=timeout)
            task.cancel()
        if self.transport is not None:
            self.transport.close()

    # --- requests ---------------------------------------------------------------------

    def _next(self) -> None:
        request = self._request = self._queue.popleft()
        self.answered = False
        self._task = asyncio.get_running_loop().create_task(self._serve(request))

    async def _serve(self, request: InboundRequest) -> None:
        reply: Reply | None = None
        try:
            reply = await self._handler(request)
            await reply.finish(request)
        except asyncio.CancelledError:
            self.closing = True  # the client left, or the drain ran out
        except ConnectionError:
            self.closing = True
        except Exception:
            self._server.log.exception("request_failed", method=request.method)
            self.closing = True
            transport = self.transport
            if transport is not None and not transport.is_closing() and not self.answered:
                transport.write(INTERNAL_ERROR)
        finally:
            self._task = None
            self._request = None
            self.write_listener = None
        if reply is not None and reply.closes:
            self.closing = True
        content = request.content
        if not content.is_eof() and content.exception() is None and self.transport is not None:
            await self._linger(content)
        self._done()

    async def _linger(self, payload: BodyStream) -> None:
        try:
            async with asyncio.timeout(LINGERING_TIME):
                while await payload.readany():
                    pass
        except (Exception, asyncio.CancelledError):  # a broken or slow body only means: close
            pass
        if not payload.at_eof():
            self.closing = True

    def _done(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if self._error is not None:
            if not transport.is_closing():
                transport.write(self._error)
            transport.close()
            return
        if self.closing:
            transport.close()
            return
        if self._queue:
            self._next()
            self._pace()
        else:
            server = self._server
            self._arm(min(server.header_timeout, server.keepalive_timeout))

    def _refuse(self, answer: bytes, status: int, problem: str) -> None:
        """Malformed or refused input: nothing more is read. A request whose body broke
        mid-way fails its body stream (its handler answers 400 now and the upload stops);
        otherwise `answer` goes out after the current request's answer."""
        self._server.log.info("bad_request", status=status, problem=problem)
        self._parser = None
        self.closing = True
        body, self._body = self._body, None
        if body is not None and not body.is_eof():
            body.set_exception(BadRequestBody("malformed request body framing"))
            if self._task is not None and body is self._request_body():
                return  # its handler answers (400, unless it already answered)
        self._error = answer
        if self._task is None:
            self._done()

    def _request_body(self) -> BodyStream | None:
        request = self._request
        return request.content if request is not None else None

    # --- the header timer -------------------------------------------------------------
    # It runs while the connection waits for a request's headers: from its start, and
    # again after each answer. Arming only moves the deadline; the one timer re-checks it
    # when it fires, so a busy keep-alive connection makes no timer per request.

    def _arm(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = deadline = loop.time() + delay
        timer = self._timer
        if timer is not None and deadline < timer.when():
            timer.cancel()  # an earlier deadline (keep-alive after a long header wait)
            timer = None
        if timer is None:
            self._timer = loop.call_at(deadline, self._expire)

    def _stop_timer(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return  # headers arrived meanwhile: the next _arm starts a new timer
        loop = asyncio.get_running_loop()
        if loop.time() < deadline:
            self._timer = loop.call_at(deadline, self._expire)
            return
        transport = self.transport
        if transport is None:
            return
        if self._rejected:
            transport.abort()
        elif self._task is None and not self._queue:
            self.closing = True
            transport.close()


class _Dropped(asyncio.Protocol):
    """Stands in for a connection whose setup failed: it is closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()


class InboundServer:
    """The protocol factory for `loop.create_server`, and the set of its connections.

    A connection that cannot be set up is closed and its cause logged at ERROR, once per
    cause (asyncio itself reports it only in debug mode: silent resets otherwise).
    """

    def __init__(self, handler: Handler, *, header_timeout: float, keepalive_timeout: float,
                 max_connections: int, log: Any) -> None:
        self.handler = handler
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self.log = log
        self.connections: set[ClientConnection] = set()
        self._setup_failures: set[tuple[str, str]] = set()

    def __call__(self) -> asyncio.Protocol:
        try:
            return ClientConnection(self)
        except Exception as exc:
            self.setup_failed(exc)
            return _Dropped()

    def setup_failed(self, exc: BaseException) -> None:
        cause = (type(exc).__name__, str(exc))
        if cause not in self._setup_failures and len(self._setup_failures) < 64:
            self._setup_failures.add(cause)
            self.log.error("connection_setup_failed", error_type=cause[0], error=cause[1])

    def pre_shutdown(self) -> None:
        """Idle keep-alive connections close now, busy ones after their answer."""
        for conn in list(self.connections):
            conn.shutdown_idle()

    async def shutdown(self, timeout: float) -> None:
        connections = list(self.connections)
        if connections:
            await asyncio.gather(*(conn.shutdown(timeout) for conn in connections))
        self.connections.clear()
