"""Both ends of an HTTP/1.1 exchange on raw sockets, for tests where framing is the point.

`Target` is a target the test controls byte for byte: it records every request exactly
as it arrived (head and body, and whether the body's framing ended) and answers with
whatever the test's `Answer` writes; a request for `/ok` always gets `200 ok`, so the
same target shows that the proxy still serves the next request. `Conn` is a client
connection that sends any bytes and reads responses however they are framed.
Nothing here knows the proxy's internals: it sees only what crosses the sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from helpers import WAIT, RawConn

OK_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


def split_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """(start line, [(name, value)]) of a head, values without surrounding blanks."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    fields = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields.append((name, value.strip(b" \t")))
    return lines[0], fields


@dataclass
class Received:
    """One request as the target received it."""

    head: bytes
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False  # the body's framing ended (False: the connection ended first)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # body read, or given up

    @property
    def method(self) -> bytes:
        return self.head.split(b" ", 1)[0]

    @property
    def path(self) -> bytes:
        return self.head.split(b" ", 2)[1]

    def header(self, name: str) -> list[bytes]:
        wanted = name.lower().encode()
        return [value for key, value in split_head(self.head)[1] if key.lower() == wanted]


# Writes the answer to `request`; returns True to keep the connection for another request.
Answer = Callable[[Received, asyncio.StreamWriter], Awaitable[bool]]


def fixed(data: bytes, *, close: bool = False) -> Answer:
    """An answer of exactly `data`; with `close`, the connection ends after it."""

    async def answer(request: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        await writer.drain()
        return not close

    return answer


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """A head line by line, so its size is bounded only by the size of each line."""
    head = await reader.readuntil(b"\r\n")
    while True:
        line = await reader.readuntil(b"\r\n")
        head += line
        if line == b"\r\n":
            return head


async def _read_body(reader: asyncio.StreamReader, request: Received) -> None:
    """The request's body by its framing (none, Content-Length or chunked)."""
    body = request.body
    if any(b"chunked" in value.lower() for value in request.header("Transfer-Encoding")):
        # Piece by piece as it arrives, so a test can see a chunk's first bytes.
        async for piece in iter_chunked(reader):
            body += piece
    else:
        lengths = request.header("Content-Length")
        if lengths:
            body += await reader.readexactly(int(lengths[0]))
    request.complete = True


@dataclass
class Target:
    """A raw-socket target: records each request, then answers it (see module docstring)."""

    answer: Answer
    requests: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a request head came

    async def serve(self, conn: RawConn) -> None:
        """The `raw_upstream` fixture's per-connection script."""
        reader, writer = conn.reader, conn.writer
        while True:
            try:
                head = await read_head(reader)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            request = Received(head)
            self.requests.append(request)
            self.arrived.set()
            try:
                await _read_body(reader, request)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                    ValueError):
                return
            finally:
                request.ended.set()
            if request.path == b"/ok":
                writer.write(OK_ANSWER)
                await writer.drain()
                continue
            if not await self.answer(request, writer):
                return

    def to(self, path: bytes) -> list[Received]:
        """The requests that asked for `path` (query included)."""
        return [request for request in self.requests if request.path == path]

    async def nth(self, n: int) -> Received:
        """The n-th request (from 1) once its head has arrived (bounded)."""
        async with asyncio.timeout(WAIT):
            while len(self.requests) < n:
                self.arrived.clear()
                await self.arrived.wait()
        return self.requests[n - 1]


@dataclass
class Response:
    """One response as the client received it."""

    status: int
    start: bytes  # the status line, as sent
    headers: list[tuple[bytes, bytes]]
    body: bytes
    framing: str  # "length", "chunked", "close" or "none"

    @property
    def reason(self) -> bytes:
        parts = self.start.split(b" ", 2)
        return parts[2] if len(parts) > 2 else b""

    def header(self, name: str) -> list[bytes]:
        wanted = name.lower().encode()
        return [value for key, value in self.headers if key.lower() == wanted]

    @property
    def closes(self) -> bool:
        """The proxy said this connection ends with this response."""
        return (self.framing == "close"
                or any(b"close" in value.lower() for value in self.header("Connection")))

    def json(self) -> Any:
        return json.loads(self.body)


async def iter_chunked(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """A chunked body's payload as it arrives, piece by piece (trailers skipped); a
    ValueError when its framing breaks."""
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0].strip(), 16)
        if not size:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers
            return
        while size:
            piece = await reader.read(min(size, 2**20))
            if not piece:
                raise asyncio.IncompleteReadError(b"", size)
            size -= len(piece)
            yield piece
        if await reader.readexactly(2) != b"\r\n":
            raise ValueError("chunk data not followed by CRLF")


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    return b"".join([piece async for piece in iter_chunked(reader)])


async def read_response(reader: asyncio.StreamReader, *, method: bytes = b"GET") -> Response:
    """The next response on the connection, its body read by its framing (not bounded:
    wrap it in `asyncio.wait_for`)."""
    while True:
        head = await read_head(reader)
        start, headers = split_head(head)
        assert start.startswith(b"HTTP/1."), f"not a status line: {start[:80]!r}"
        status = int(start.split(b" ", 2)[1])
        if not 100 <= status <= 199:
            break
    names = {name.lower(): value for name, value in headers}
    if method == b"HEAD" or status in (204, 304):
        return Response(status, start, headers, b"", "none")
    if b"chunked" in names.get(b"transfer-encoding", b"").lower():
        return Response(status, start, headers, await read_chunked(reader), "chunked")
    if b"content-length" in names:
        body = await reader.readexactly(int(names[b"content-length"]))
        return Response(status, start, headers, body, "length")
    return Response(status, start, headers, await reader.read(-1), "close")


class Conn:
    """A client connection to the proxy: raw bytes out, parsed responses in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, method: bytes = b"GET", wait: float = WAIT) -> Response:
        return await asyncio.wait_for(read_response(self.reader, method=method), wait)

    async def head(self, wait: float = WAIT) -> Response:
        """Only the next response's head (its body is left to read), e.g. for a stream."""
        head = await asyncio.wait_for(read_head(self.reader), wait)
        start, headers = split_head(head)
        return Response(int(start.split(b" ", 2)[1]), start, headers, b"", "")

    async def closed(self, wait: float = WAIT) -> bytes:
        """Wait for the proxy to end the connection; returns whatever came before the end."""
        data = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(wait):
                while chunk := await self.reader.read(65536):
                    data += chunk
        return data

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def get(path: str = "/mcp", *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def post(body: bytes, path: str = "/mcp", *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


CHUNKED_POST_HEAD = (b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                     b"\r\nTransfer-Encoding: chunked\r\n\r\n")


async def serves_next(port: int, conn: Conn, last: Response) -> None:
    """The proxy answers another request: on `conn` unless `last` ended it, else anew."""
    if last.closes:
        await conn.close()
        conn = await Conn.open(port)
    try:
        await conn.send(get("/ok"))
        answer = await conn.response()
        assert (answer.status, answer.body) == (200, b"ok"), answer.start
    finally:
        await conn.close()
