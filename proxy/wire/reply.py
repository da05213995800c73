"""The answer to one client request, as it goes out: `Reply`.

Headers and a small body go in one write; chunked framing when the length is unknown
and the client speaks HTTP/1.1; `Connection: close` when the connection ends with the
answer. The connection and request it answers are seen through two small protocols, so
this module needs nothing of the server's.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Protocol

from multidict import CIMultiDict

from .chunked import LAST_CHUNK, chunk
from .head import http_date, serialize_head

HTTP10 = (1, 0)
HTTP11 = (1, 1)


class ReplyConnection(Protocol):
    """What a reply needs of its client connection."""

    transport: asyncio.Transport | None
    closing: bool  # no further request on this connection
    answered: bool  # bytes of the current request's answer went out

    def close_after_reply(self) -> None: ...
    async def drain(self) -> None: ...


class ReplyRequest(Protocol):
    """What a reply needs of the request it answers."""

    @property
    def protocol(self) -> ReplyConnection: ...
    @property
    def method(self) -> str: ...
    @property
    def version(self) -> tuple[int, int]: ...
    @property
    def should_close(self) -> bool: ...


class WriteListener(Protocol):
    """Told when the client's write buffer crosses its high-water mark (a pushed relay)."""

    def client_paused(self) -> None: ...
    def client_resumed(self) -> None: ...


class Reply:
    """The answer to one request: status line, headers, then the body as it comes.

    `headers` is a multidict or a list of (name, value) fields, in order; a body's length
    as given there is trusted. `body` set: sent whole with a Content-Length by `finish()`.
    Otherwise `start()`
    frames it: the headers' Content-Length as given, chunked for an HTTP/1.1 client,
    else until the connection closes. Returned by the handler; the connection finishes
    whatever the handler did not. `start()` raises ValueError for a head that cannot be
    written safely (a control character in a header), before anything is sent.
    """

    __slots__ = ("_chunked", "_close", "_conn", "_head", "_hold", "_no_body", "body",
                 "finished", "headers", "prepared", "reason", "status")

    def __init__(self, status: int, reason: str | None = None,
                 headers: CIMultiDict[str] | list[tuple[str, str]] | None = None,
                 body: bytes | None = None, content_type: str | None = None) -> None:
        self.status = status
        self.reason = reason
        # As given: `start()` adds the framing fields to the head it writes, not here.
        self.headers: CIMultiDict[str] | list[tuple[str, str]] = (
            headers if headers is not None else CIMultiDict())
        if content_type is not None:
            if isinstance(self.headers, list):
                self.headers.append(("Content-Type", content_type))
            else:
                self.headers.add("Content-Type", content_type)
        self.body = body
        self.prepared = False
        self.finished = False
        self._conn: ReplyConnection | None = None
        self._head: bytes | None = None  # headers not yet written
        self._hold = False
        self._chunked = False
        self._no_body = False
        self._close = False

    @property
    def chunked(self) -> bool:
        return self._chunked

    @property
    def closes(self) -> bool:
        """The connection closes after this answer."""
        return self._close

    def force_close(self) -> None:
        """Close the client connection after this answer."""
        self._close = True

    def send_headers_with_body(self) -> None:
        """Hold the headers back until the first body write (one packet, not two)."""
        self._hold = True

    def start(self, request: ReplyRequest) -> Reply:
        """Fix the framing and send the headers (or hold them for the first write)."""
        if self.prepared:
            return self
        conn = request.protocol
        headers = self.headers
        fields = list(headers) if isinstance(headers, list) else list(headers.items())
        names = {name.lower() for name, _ in fields}
        status = self.status
        version = request.version
        no_body = self._no_body = (request.method == "HEAD" or status < 200
                                   or status in (204, 304))
        keep = not (self._close or request.should_close or conn.closing)
        chunked = False
        if self.body is not None:
            if (not no_body or request.method == "HEAD") and "content-length" not in names:
                fields.append(("Content-Length", str(len(self.body))))
        elif no_body or "content-length" in names:
            pass
        elif version >= HTTP11:
            fields.append(("Transfer-Encoding", "chunked"))
            chunked = True
        else:
            keep = False  # an HTTP/1.0 client reads this body until the connection closes
        if "connection" in names:
            fields = [(n, v) for n, v in fields if n.lower() != "connection"]
        if not keep:
            fields.append(("Connection", "close"))
        elif version == HTTP10:
            fields.append(("Connection", "keep-alive"))
        if "date" not in names:
            fields.append(("Date", http_date()))
        reason = self.reason
        if reason is None:
            reason = _REASONS.get(status, "")
        head = serialize_head(f"HTTP/{version[0]}.{version[1]} {status} {reason}", fields)
        # Nothing above wrote or changed the connection: a bad head leaves it answerable.
        self.prepared = True
        self._conn = conn
        self._chunked = chunked
        if not keep:
            conn.close_after_reply()
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

    async def write(self, data: bytes) -> None:
        self.send_now(data)
        await self.drain()

    def send_now(self, data: bytes) -> None:
        """`write()` without waiting for the client to take it (for a caller that cannot
        wait: the bytes are buffered by the transport)."""
        if not data or self._no_body:
            return
        if self._chunked:
            data = chunk(data)
        head, self._head = self._head, None
        self._send(head + data if head is not None else data)

    def send_pieces(self, pieces: list[bytes]) -> int:
        """Like `send_now` for several pieces in one write, none of them copied (a bulk
        body's reads): each becomes a chunk of its own. Returns the payload bytes."""
        if self._no_body:
            return 0
        size = 0
        out: list[bytes] = []
        head, self._head = self._head, None
        if head is not None:
            out.append(head)
        chunked = self._chunked
        for piece in pieces:
            if piece:
                size += len(piece)
                if chunked:
                    out.append(b"%x\r\n" % len(piece))
                    out.append(piece)
                    out.append(b"\r\n")
                else:
                    out.append(piece)
        if out:
            conn = self._conn
            transport = conn.transport if conn is not None else None
            if transport is None or transport.is_closing():
                raise ConnectionResetError("cannot write to a closing client connection")
            conn.answered = True  # type: ignore[union-attr]
            if len(out) == 1:
                transport.write(out[0])
            else:
                transport.writelines(out)
        return size

    async def drain(self) -> None:
        conn = self._conn
        if conn is not None:
            await conn.drain()

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
            out = chunk(data) if self._chunked else data
        if self._chunked:
            out += LAST_CHUNK
        head, self._head = self._head, None
        if head is not None:
            out = head + out
        if out:
            self._send(out)

    async def finish(self, request: ReplyRequest) -> None:
        """Send whatever the handler left unsent: headers, the whole body, the end."""
        if not self.finished:
            self.start(request)
            self.send_eof(self.body or b"")
        await self.drain()


_REASONS = {status.value: status.phrase for status in HTTPStatus}
