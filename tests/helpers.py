"""What many test files share and a fixture cannot give: the wait bounds, one bounded
polling helper, the chunked framing of a test body, and the raw-socket upstream behind
the `raw_upstream` fixture (tests/conftest.py).

Import it by name (`from helpers import WAIT, eventually`): pytest puts `tests/` on
`sys.path` (tests/ has a conftest.py and no `__init__.py`), so this works from every
folder below it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TypeVar

# Bounds on every wait. Never reached when things work: the happy path takes milliseconds.
WAIT = 5.0  # an event in this process (a request, a callback, a file the proxy writes)
LONG_WAIT = 10.0  # another process or a real SDK on the far side (startup, drain, a hook)
SLOW_WAIT = 30.0  # a process under load, or a stream that must stay open that long

T = TypeVar("T")


async def eventually(predicate: Callable[[], T | Awaitable[T]], within: float = WAIT, *,
                     what: str = "", every: float = 0.01) -> T:
    """Poll `predicate` (plain or async) until it gives a true value, and return that value;
    raise AssertionError naming what was awaited if `within` seconds pass first.

    Only for state nothing signals (a file watcher, another process, a counter in the
    code under test): where there is an event, wait on the event.
    """
    try:
        async with asyncio.timeout(within) as bound:
            while True:
                value = predicate()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return value  # type: ignore[return-value]
                await asyncio.sleep(every)
    except TimeoutError:
        if not bound.expired():
            raise
        raise AssertionError(
            f"not true within {within} s: {what or _describe(predicate)}") from None


def _describe(predicate: Callable[..., object]) -> str:
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return getattr(predicate, "__qualname__", repr(predicate))


def chunk(data: bytes) -> bytes:
    """`data` as one chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def unchunk(framed: bytes) -> bytes:
    """The payload of chunks (up to the last chunk, which may be left off), checked
    strictly here: a size line, the data, CRLF, with nothing of the proxy's code."""
    data, out, pos = framed + b"0\r\n\r\n", [], 0
    while True:
        cut = data.index(b"\r\n", pos)
        size = int(data[pos:cut].split(b";", 1)[0], 16)
        if not size:
            return b"".join(out)
        out.append(data[cut + 2:cut + 2 + size])
        assert data[cut + 2 + size:cut + 4 + size] == b"\r\n", "chunk data not ended by CRLF"
        pos = cut + 4 + size


class RawConn:
    """One connection to a `raw_upstream`: its streams, its number (1, 2, ...) and the
    head of the request last read on it."""

    def __init__(self, upstream: RawUpstream, number: int,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.upstream = upstream
        self.number = number
        self.reader = reader
        self.writer = writer
        self.head = b""

    @property
    def path(self) -> str:
        return self.head.split(b" ", 2)[1].decode("latin-1") if self.head else ""

    async def read_head(self) -> bytes:
        """The next request's head (raises IncompleteReadError once the proxy closes)."""
        self.head = await self.reader.readuntil(b"\r\n\r\n")
        self.upstream.requests.append(self.head)
        self.upstream.changed.set()
        return self.head

    async def read_request(self) -> bytes:
        """The next request's head and its Content-Length body, as one bytes."""
        await self.read_head()
        length = 0
        for line in self.head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = self.head + await self.reader.readexactly(length)
        self.upstream.requests[-1] = request
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock: socket.socket = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def wait_closed_by_peer(self) -> None:
        """Return once the proxy's side of this connection is gone (EOF or reset)."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass


RawServe = Callable[[RawConn], Awaitable[None]]


class RawUpstream:
    """A loopback target on raw asyncio streams: `serve(conn)` runs once per connection
    and writes exactly what the test wants; the connection is closed when it returns.
    Counts connections (and those still open) and records every request head it read."""

    def __init__(self, serve: RawServe) -> None:
        self.serve = serve
        self.port = 0
        self.connections = 0
        self.open = 0
        self.requests: list[bytes] = []
        self.changed = asyncio.Event()  # set on every connection, request and close
        self.tasks: set[asyncio.Task[None]] = set()

    def url(self, path: str = "/mcp") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate` holds, checked on each change; bounded by WAIT."""
        async with asyncio.timeout(WAIT):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        self.open += 1
        self.changed.set()
        try:
            await self.serve(RawConn(self, self.connections, reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.open -= 1
            self.changed.set()
            self.tasks.discard(task)
