"""A request body as it arrives from the client: one reader, whose pace paces the socket.

`BodyStream` buffers what the parser hands it; above `BODY_HIGH_WATER` buffered bytes
it asks its connection to stop reading from the client (`body_full(True)`), and asks it
to read again once its reader took them. A body whose framing breaks mid-way fails with
`BadRequestBody`; one whose client left, with what the connection says.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

# Request body bytes buffered before reading from the client pauses (it resumes once the
# reader took them): a slow target stalls the client, the proxy holds one window.
BODY_HIGH_WATER = 2**16


class BadRequestBody(Exception):
    """The request body's framing broke mid-body (a malformed chunk): answer 400, close."""




class Pacer(Protocol):
    """The connection a body arrives on: told when its reader fell behind or caught up."""

    def body_full(self, full: bool) -> None: ...


class BodyStream:
    """A request body as it arrives, for one reader; reading paces the socket.

    `is_eof()`: every byte arrived (some may still be buffered); `at_eof()`: and read.
    """

    __slots__ = ("_buffer", "_conn", "_eof", "_exc", "_size", "_waiter", "total_bytes")

    def __init__(self, conn: Pacer | None) -> None:
        self._conn = conn
        self._buffer: deque[bytes] = deque()
        self._size = 0
        self._eof = conn is None
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.total_bytes = 0

    def feed(self, data: bytes) -> None:
        self._buffer.append(data)
        self._size += len(data)
        self.total_bytes += len(data)
        self._wake()
        conn = self._conn
        if self._size > BODY_HIGH_WATER and conn is not None:
            conn.body_full(True)

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if self._exc is None and not self._eof:
            self._exc = exc
        self._wake()

    def exception(self) -> BaseException | None:
        return self._exc

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def is_eof(self) -> bool:
        return self._eof

    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    def read_nowait(self, n: int = -1) -> bytes:
        """Everything buffered (`n` is accepted for the StreamReader shape; all is read)."""
        buffer = self._buffer
        if not buffer:
            return b""
        data = buffer.popleft() if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self._size = 0
        conn = self._conn
        if conn is not None:
            conn.body_full(False)
        return data

    async def readany(self) -> bytes:
        """The next bytes of the body; b"" at its end. Raises what broke it."""
        while not self._buffer:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            conn = self._conn
            if conn is not None:
                conn.body_full(False)  # a reader waits: whatever paused reading is over
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.read_nowait()


EMPTY_BODY = BodyStream(None)
