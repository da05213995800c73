"""The client side of the proxy: a lean HTTP/1.1 server protocol on aiohttp's C parser.

aiohttp's web server spends about a third of the proxy's CPU per request on things a
reverse proxy does not use (a request object with lazy properties, a response object
that negotiates content, a task loop per connection besides the task per request).
This protocol keeps what the proxy needs: aiohttp's llhttp-based `HttpRequestParser`,
its `StreamReader` bodies with their flow control, one task per request, pipelining in
order, keep-alive, a request-header timeout (slowloris), a connection cap (503 above
it), lingering on an unread body, JSON 400/431 answers for malformed input that quote
nothing back, and a drain at shutdown. Responses are written by `Reply`: headers and a
small body in one write, chunked framing when the length is unknown and the client
speaks HTTP/1.1, `Connection: close` when the connection ends with the answer.
It must never block the loop and never leave a socket or task behind after `shutdown`.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, cast

from aiohttp import hdrs
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.http_writer import _serialize_headers
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy

from .limits import MAX_HEADER_LINE

# After the answer, how long a client still sending an unwanted body (a 413) is read
# and ignored before its connection is closed: closing at once would reset the
# connection and could destroy the answer before the client read it.
LINGERING_TIME = 1.0
# Pipelined requests parsed ahead of the one being served; above this the socket is not
# read until the queue drains (what one read holds is parsed: at most one buffer's worth).
MAX_QUEUED = 32
READ_LIMIT = 2**16
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


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
_HEADERS_TOO_LARGE = _fixed_answer("431 Request Header Fields Too Large",
                                   "request_header_fields_too_large",
                                   "the request line or headers are too large")
_BAD_REQUEST = _fixed_answer("400 Bad Request", "bad_request",
                             "the request is not valid HTTP/1.1")
_INTERNAL_ERROR = _fixed_answer("500 Internal Server Error", "internal_error",
                                "the proxy failed to handle the request")


class InboundRequest:
    """One parsed client request: the parser's message and its body stream."""

    __slots__ = ("content", "headers", "method", "protocol", "raw_path", "remote",
                 "should_close", "version")

    def __init__(self, protocol: ClientConnection, message: RawRequestMessage,
                 content: StreamReader) -> None:
        self.protocol = protocol
        self.method: str = message.method
        self.raw_path: str = message.path
        self.version = message.version
        self.headers: CIMultiDictProxy[str] = message.headers
        self.should_close: bool = message.should_close
        self.content = content
        self.remote = protocol.remote

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.protocol.transport

    @property
    def host(self) -> str:
        """The Host header, else the address the client connected to."""
        host = self.headers.get(hdrs.HOST)
        if host:
            return host
        transport = self.protocol.transport
        sock = transport.get_extra_info("sockname") if transport is not None else None
        return f"{sock[0]}:{sock[1]}" if isinstance(sock, tuple) else "localhost"

    @property
    def body_exists(self) -> bool:
        return self.content is not EMPTY_PAYLOAD

    @property
    def content_length(self) -> int | None:
        value = self.headers.get(hdrs.CONTENT_LENGTH)
        return int(value) if value is not None else None  # the parser checked the digits

    def send_continue(self) -> None:
        """Answer `Expect: 100-continue` (the proxy takes it off the upstream request)."""
        transport = self.protocol.transport
        if transport is not None and not transport.is_closing():
            transport.write(CONTINUE)


class Reply:
    """The answer to one request: status line, headers, then the body as it comes.

    `body` set: sent whole with a Content-Length by `finish()`. Otherwise `start()`
    frames it: the headers' Content-Length as given, chunked for an HTTP/1.1 client,
    else until the connection closes. Returned by the handler; the connection finishes
    whatever the handler did not.
    """

    __slots__ = ("_chunked", "_close", "_conn", "_head", "_hold", "_no_body", "body",
                 "finished", "headers", "prepared", "reason", "status")

    def __init__(self, status: int, reason: str | None = None,
                 headers: CIMultiDict[str] | None = None, body: bytes | None = None,
                 content_type: str | None = None) -> None:
        self.status = status
        self.reason = reason
        self.headers: CIMultiDict[str] = headers if headers is not None else CIMultiDict()
        if content_type is not None:
            self.headers[hdrs.CONTENT_TYPE] = content_type
        self.body = body
        self.prepared = False
        self.finished = False
        self._conn: ClientConnection | None = None
        self._head: bytes | None = None  # headers not yet written
        self._hold = False
        self._chunked = False
        self._no_body = False
        self._close = False

    @property
    def chunked(self) -> bool:
        return self._chunked

    def force_close(self) -> None:
        """Close the client connection after this answer."""
        self._close = True

    def send_headers_with_body(self) -> None:
        """Hold the headers back until the first body write (one packet, not two)."""
        self._hold = True

    def start(self, request: InboundRequest) -> Reply:
        """Fix the framing and send the headers (or hold them for the first write)."""
        if self.prepared:
            return self
        self.prepared = True
        conn = self._conn = request.protocol
        headers = self.headers
        status = self.status
        version = request.version
        self._no_body = (request.method == hdrs.METH_HEAD or status < 200
                         or status in (204, 304))
        keep = not (self._close or request.should_close or conn.closing)
        if self.body is not None:
            if not self._no_body or request.method == hdrs.METH_HEAD:
                headers[hdrs.CONTENT_LENGTH] = str(len(self.body))
        elif self._no_body or hdrs.CONTENT_LENGTH in headers:
            pass
        elif version >= HttpVersion11:
            headers[hdrs.TRANSFER_ENCODING] = "chunked"
            self._chunked = True
        else:
            keep = False  # an HTTP/1.0 client reads this body until the connection closes
        if not keep:
            headers[hdrs.CONNECTION] = "close"
            conn.close_after_reply()
        elif version == HttpVersion10:
            headers[hdrs.CONNECTION] = "keep-alive"
        if hdrs.DATE not in headers:
            headers[hdrs.DATE] = rfc822_formatted_time()
        reason = self.reason
        if reason is None:
            reason = _reason(status)
        line = f"HTTP/{version.major}.{version.minor} {status} {reason}"
        head: bytes = _serialize_headers(line, headers)
        if self._hold:
            self._head = head
        else:
            self._send(head)
        return self

    def _send(self, data: bytes) -> None:
        conn = self._conn
        transport = conn.transport if conn is not None else None
        if transport is None or transport.is_closing():
            raise ConnectionResetError("cannot write to a closing client connection")
        conn.answered = True  # type: ignore[union-attr]
        transport.write(data)

    def _framed(self, data: bytes) -> bytes:
        if self._chunked:
            return b"%x\r\n%b\r\n" % (len(data), data)
        return data

    async def write(self, data: bytes) -> None:
        self.send_now(data)
        await self.drain()

    def send_now(self, data: bytes) -> None:
        """`write()` without waiting for the client to take it (for a caller that cannot
        wait: the bytes are buffered by the transport)."""
        if not data or self._no_body:
            return
        head, self._head = self._head, None
        self._send(head + self._framed(data) if head is not None else self._framed(data))

    async def drain(self) -> None:
        conn = self._conn
        if conn is not None and conn.writing_paused:
            await conn._drain_helper()

    async def write_eof(self, data: bytes = b"") -> None:
        self.send_eof(data)
        await self.drain()

    def send_eof(self, data: bytes = b"") -> None:
        """The rest of the body and the end of the message, without waiting for the client
        to read it (`drain()` does)."""
        if self.finished:
            return
        self.finished = True
        out = b""
        if data and not self._no_body:
            out = self._framed(data)
        if self._chunked:
            out += b"0\r\n\r\n"
        head, self._head = self._head, None
        if head is not None:
            out = head + out
        if out:
            self._send(out)

    async def finish(self, request: InboundRequest) -> None:
        """Send whatever the handler left unsent: headers, the whole body, the end."""
        if not self.finished:
            self.start(request)
            self.send_eof(self.body or b"")
        conn = self._conn
        if conn is not None and conn.writing_paused:
            await conn._drain_helper()


_REASONS = {status.value: status.phrase for status in HTTPStatus}


def _reason(status: int) -> str:
    return _REASONS.get(status, "")


Handler = Callable[[InboundRequest], Awaitable[Reply]]


class ClientConnection(BaseProtocol):
    """One client connection: parse, serve requests one at a time, keep alive or close."""

    __slots__ = ("_deadline", "_error", "_handler", "_queue", "_rejected", "_request",
                 "_server", "_task", "_timer", "answered", "closing", "remote")

    def __init__(self, server: InboundServer) -> None:
        loop = server.loop
        parser = HttpRequestParser(
            self, loop, READ_LIMIT, max_line_size=MAX_HEADER_LINE, max_field_size=MAX_HEADER_LINE,
            payload_exception=RequestPayloadError, auto_decompress=False,
        )
        super().__init__(loop, parser)
        self._server = server
        self._handler = server.handler
        self._queue: deque[tuple[RawRequestMessage, StreamReader]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._request: InboundRequest | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._rejected = False
        self._error: bytes | None = None  # a parse error's answer, due after the current one
        self.closing = False  # no further request on this connection
        self.answered = False  # bytes of the current request's answer went out
        self.remote: str | None = None

    # --- the connection's life --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        self.transport = cast(asyncio.Transport, transport)
        if len(server.connections) >= server.max_connections:
            # Over the cap: answer 503 to whatever the client sends first, then close.
            self._rejected = True
            self._arm(server.header_timeout)
            return
        super().connection_made(transport)
        server.connections.add(self)
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
        if self._error is not None:
            return  # the stream is broken: nothing after the bad request is read
        parser = self._parser
        assert parser is not None
        try:
            messages, upgraded, _tail = parser.feed_data(data)
        except HttpProcessingError as exc:
            self._bad_request(exc)
            return
        if messages:
            self._deadline = None  # complete headers arrived
            self._queue.extend(messages)
            if self._task is None:
                self._next()
            if len(self._queue) >= MAX_QUEUED and not self._buffer_paused:
                self._pause_reading_for_buffer()
        if upgraded:
            self.closing = True  # no protocol switch through this proxy: end after it

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._server.connections.discard(self)
        self._stop_timer()
        self.closing = True
        if self._rejected:
            return
        request = self._request
        if request is not None and not request.content.is_eof():
            request.content.set_exception(ConnectionResetError("the client went away"))
        for _message, payload in self._queue:
            if not payload.is_eof():
                payload.set_exception(ConnectionResetError("the client went away"))
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()  # the client left: its request's work stops with it
        self._parser = None

    def eof_received(self) -> bool:
        return False  # a half-closed client: close our side when the transport does

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
        message, payload = self._queue.popleft()
        request = self._request = InboundRequest(self, message, payload)
        self.answered = False
        self._task = self._loop.create_task(self._serve(request))
        if self._buffer_paused and len(self._queue) < MAX_QUEUED:
            self._resume_reading_for_buffer()

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
                transport.write(_INTERNAL_ERROR)
        finally:
            self._task = None
            self._request = None
        if reply is not None and reply._close:
            self.closing = True
        if not request.content.is_eof() and self.transport is not None:
            await self._linger(request.content)
        self._done()

    async def _linger(self, payload: StreamReader) -> None:
        try:
            async with asyncio.timeout(LINGERING_TIME):
                while not payload.is_eof():
                    await payload.readany()
        except (Exception, asyncio.CancelledError):  # a broken or slow body only means: close
            pass
        if not payload.is_eof():
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
        else:
            server = self._server
            self._arm(min(server.header_timeout, server.keepalive_timeout))

    def _bad_request(self, exc: HttpProcessingError) -> None:
        too_large = isinstance(exc, LineTooLong) or "Too many headers" in str(exc)
        answer = _HEADERS_TOO_LARGE if too_large else _BAD_REQUEST
        self._server.log.info("bad_request", status=431 if too_large else 400,
                              problem=type(exc).__name__)
        self._error = answer
        self.closing = True
        if self._task is None:
            self._done()

    # --- the header timer -------------------------------------------------------------
    # It runs while the connection waits for a request's headers: from its start, and
    # again after each answer. Arming only moves the deadline; the one timer re-checks it
    # when it fires, so a busy keep-alive connection makes no timer per request.

    def _arm(self, delay: float) -> None:
        self._deadline = deadline = self._loop.time() + delay
        timer = self._timer
        if timer is not None and deadline < timer.when():
            timer.cancel()  # an earlier deadline (keep-alive after a long header wait)
            timer = None
        if timer is None:
            self._timer = self._loop.call_at(deadline, self._expire)

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
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._expire)
            return
        transport = self.transport
        if transport is None:
            return
        if self._rejected:
            transport.abort()
        elif self._task is None and not self._queue:
            self.closing = True
            transport.close()


class InboundServer:
    """The protocol factory for `loop.create_server`, and the set of its connections."""

    def __init__(self, handler: Handler, *, header_timeout: float, keepalive_timeout: float,
                 max_connections: int, log: Any) -> None:
        self.handler = handler
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self.log = log
        self.loop = asyncio.get_running_loop()
        self.connections: set[ClientConnection] = set()

    def __call__(self) -> ClientConnection:
        return ClientConnection(self)

    def pre_shutdown(self) -> None:
        """Idle keep-alive connections close now, busy ones after their answer."""
        for conn in list(self.connections):
            conn.shutdown_idle()

    async def shutdown(self, timeout: float) -> None:
        connections = list(self.connections)
        if connections:
            await asyncio.gather(*(conn.shutdown(timeout) for conn in connections))
        self.connections.clear()
