"""How bodies cross the proxy besides the handler's own loop.

The request body streamed once with a bounded copy for a replay (`RequestBody`); event
streams and bulk bodies passed on from the upstream socket callback (`Pump`, and
`Passthrough` byte for byte); a whole small answer sent to the client from that callback
before the waiting request task resumes (`EarlyReply`); and what the access log learns
on the way (`Progress`). `forward.Forwarder` decides which applies; these never decide
anything about credentials or errors, and never hold more than a bounded buffer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import hdrs

from ..wire.chunked import ChunkedPassthrough
from ..wire.client import LeanResponse
from ..wire.server import InboundRequest, Reply
from .rules import REDIRECT_STATUSES, response_headers

# --- the request body ---------------------------------------------------------------

class BodyTooLarge(Exception):
    """The client's chunked body crossed `max_request_bytes` while streaming."""


class RequestBody:
    """Streams the client's body to the target once, keeping a bounded copy for replay."""

    __slots__ = ("_content", "_eof", "_expect", "_keep", "_kept", "_limit", "_not_reading",
                 "_request", "_size", "_task", "too_large")

    def __init__(self, request: InboundRequest, *, limit: int, keep: int) -> None:
        self._request = request
        self._content = request.content
        self._limit = limit
        self._keep = keep
        self._kept: list[bytes] | None = []
        self._size = 0
        self._eof = False
        self.too_large = False
        # The task streaming the body upstream (aiohttp's writer) and whether it is inside
        # a read: a replay must stop it first, as a stream allows only one reader.
        self._task: asyncio.Task[Any] | None = None
        # Made by `stream()` only: a body sent whole from memory has no concurrent reader.
        self._not_reading: asyncio.Event | None = None
        self._expect = request.headers.get(hdrs.EXPECT, "").lower() == "100-continue"

    async def _read(self) -> bytes:
        if self._expect:
            # We took the client's Expect off the upstream request, so answer it ourselves.
            self._expect = False
            self._request.send_continue()
        not_reading = self._not_reading
        if not_reading is None:
            chunk = await self._content.readany()
        else:
            not_reading.clear()
            try:
                chunk = await self._content.readany()
            finally:
                not_reading.set()
        if not chunk:
            self._eof = True
            return chunk
        self._size += len(chunk)
        if self._size > self._limit:
            self.too_large = True
            self._kept = None
            raise BodyTooLarge
        if self._kept is not None:
            if self._size <= self._keep:
                self._kept.append(chunk)
            else:
                self._kept = None  # too big to replay: stop keeping, keep streaming
        return chunk

    def complete(self) -> bytes | None:
        """The whole body when it has already arrived, else None (then `stream()` it).

        The common case (a small JSON-RPC POST arrives with its headers) then goes out
        as one write with the upstream request's headers, and is trivially replayable.
        """
        content = self._content
        if self._expect or not content.is_eof() or content.total_bytes > self._limit:
            return None
        data = content.read_nowait(-1)
        self._size = len(data)
        self._eof = True
        self._kept = [data] if self._size <= self._keep else None
        return data

    async def stream(self) -> AsyncIterator[bytes]:
        """The body as the client sends it; each chunk goes on as soon as it arrives."""
        self._task = asyncio.current_task()
        self._not_reading = asyncio.Event()
        self._not_reading.set()
        while True:
            chunk = await self._read()
            if not chunk:
                return
            yield chunk

    async def replay(self) -> bytes | None:
        """The whole body for a second request, or None when it was too large to keep.

        The first upload is abandoned (its answer is already here): if it is waiting for
        the client, it is cancelled, and the rest of the body is read here instead.
        """
        if self._kept is None:
            return None
        not_reading = self._not_reading
        if not_reading is not None and not not_reading.is_set() and self._task is not None:
            self._task.cancel()
            await not_reading.wait()
        while not self._eof and self._kept is not None:
            await self._read()
        return b"".join(self._kept) if self._kept is not None else None

    def drop(self) -> None:
        """The response headers arrived: no replay from now on, free the copy."""
        self._kept = None


# Client-side write buffer above which an event stream goes back to the awaited loop,
# whose writes wait for the client to drain (a client that stops reading stalls the target).
PUSH_HIGH_WATER = 2**16


class Pump:
    """Passes an event stream on from the upstream protocol's callback, event by event.

    The awaited loop costs a task wake-up and a coroutine-chain resumption per event; on
    a burst of events from many streams at once those add up to the tail latency. This
    writes each piece to the client the moment the upstream parser hands it over. It stops
    (and the awaited loop takes over, to drain, end or fail the response as usual) at the
    end of the body, on an upstream error, a closing client, or a full client buffer.
    """

    __slots__ = ("_chunked", "_content", "_progress", "_transport", "_upstream", "done")

    def __init__(self, upstream: LeanResponse, transport: asyncio.Transport, chunked: bool,
                 progress: Progress) -> None:
        self._upstream = upstream
        self._content = upstream.content
        self._transport = transport
        self._chunked = chunked
        self._progress = progress
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __call__(self) -> None:
        content = self._content
        transport = self._transport
        if content.exception() is not None or transport.is_closing():
            self.stop()
            return
        data = content.read_nowait(-1)
        if data:
            size = len(data)
            transport.write(b"%x\r\n%b\r\n" % (size, data) if self._chunked else data)
            self._progress.bytes_out += size
            if transport.get_write_buffer_size() > PUSH_HIGH_WATER:
                self.stop()
                return
        if content.at_eof():
            self.stop()

    def stop(self) -> None:
        self._upstream.listen(None)
        if not self.done.done():
            self.done.set_result(None)


class Passthrough:
    """Passes a chunked body (an event stream or a bulk download) on byte for byte, from
    the upstream socket callback.

    Past `Pump`: aiohttp's parser and stream reader are bypassed too (about 20 Python
    calls per event, and three copies of every bulk read); the target's chunk framing is
    checked by `ChunkedPassthrough` and its bytes go to the client as they came, each
    read in one write. A client buffer above PUSH_HIGH_WATER pauses reading from the
    target until the client drains, so a client that stops reading still stalls the
    target and the proxy holds at most that plus one read. A stream that ended cleanly
    on a message boundary hands its connection back to the pool.
    """

    __slots__ = ("_decoder", "_transport", "_upstream", "_waiter", "outcome", "paused")

    ENDED, FAILED, GONE = "ended", "failed", "gone"

    def __init__(self, decoder: ChunkedPassthrough, transport: asyncio.Transport,
                 upstream: asyncio.Transport) -> None:
        self._decoder = decoder
        self._transport = transport
        self._upstream = upstream
        self._waiter: asyncio.Future[None] | None = None
        self.outcome: str | None = None
        self.paused = False

    def feed(self, data: bytes) -> None:
        decoder = self._decoder
        try:
            out = decoder.feed(data)
        except ValueError:
            self._finish(self.FAILED)
            return
        if out:
            transport = self._transport
            if transport.is_closing():
                self._finish(self.GONE)
                return
            transport.write(out)
            if transport.get_write_buffer_size() > PUSH_HIGH_WATER and not self.paused:
                self.paused = True
                self._upstream.pause_reading()
                self._wake()
        if decoder.done:
            self._finish(self.ENDED)

    def lost(self, exc: BaseException | None) -> None:
        self._finish(self.FAILED)

    def _finish(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run(self, writer: Any) -> str:
        """Wait for the end (draining the client whenever it fell behind)."""
        loop = asyncio.get_running_loop()
        while self.outcome is None:
            if self.paused:
                await writer.drain()
                self.paused = False
                if not self._upstream.is_closing():
                    self._upstream.resume_reading()
                continue
            self._waiter = loop.create_future()
            await self._waiter
            self._waiter = None
        return self.outcome

    def unpause(self) -> None:
        """Read from the target again (its body ended while the client was behind)."""
        if self.paused:
            self.paused = False
            if not self._upstream.is_closing():
                self._upstream.resume_reading()


class Progress:
    """What the access log and `on_complete` need, filled in as the request goes."""

    __slots__ = ("bytes_out", "upstream_status")

    def __init__(self) -> None:
        self.bytes_out = 0
        self.upstream_status: int | None = None


class EarlyReply:
    """Answers the client from the upstream socket callback, before the waiting request
    task resumes through its coroutine frames: the client's latency no longer waits.

    Two cases. A whole answer that goes to the client as it is (the common small
    JSON-RPC one) is sent complete; the task does everything else after (observers,
    pooling, the access event). An event stream answering a POST (MCP's Streamable HTTP)
    is started: its head and whatever events came with it go out at once, and the task
    carries the stream on from there (`streaming`, `data`). When 100 streams start
    together, a stream's first events then wait for no other stream's setup. Answers the
    handler may still act on (a redirect to follow, a 401 to refresh and replay or to
    replace, a GET
    event stream whose `endpoint` may need rewriting, any other body still coming) are
    left to it.
    """

    __slots__ = ("_hold_auth", "_refreshable", "_request", "data", "reply", "streaming")

    def __init__(self, request: InboundRequest, *, refreshable: bool, hold_auth: bool) -> None:
        self._request = request
        self._refreshable = refreshable
        self._hold_auth = hold_auth  # 401 and 403 are the handler's to replace
        self.reply: Reply | None = None
        self.streaming = False  # the stream was started here; the task carries it on
        self.data = b""  # the body bytes sent here

    def __call__(self, message: Any, payload: Any) -> None:
        status = message.code
        if status in REDIRECT_STATUSES or (status == 401 and self._refreshable) or (
                self._hold_auth and status in (401, 403)):
            return
        if payload.exception() is not None:
            return
        headers = message.headers
        if headers.get(hdrs.CONTENT_TYPE, "").startswith("text/event-stream"):
            if payload.is_eof() or self._request.method != hdrs.METH_POST:
                return
            self._start_stream(message, payload)
            return
        if not payload.is_eof():
            return
        chunk = payload.read_nowait(-1)
        reply = Reply(status, message.reason, response_headers(headers))
        reply.send_headers_with_body()
        self.reply = reply
        self.data = chunk
        try:
            reply.start(self._request)
            reply.send_eof(chunk)
        except ConnectionError:
            self._request.protocol.force_close()  # the client left: nothing more to send

    def _start_stream(self, message: Any, payload: Any) -> None:
        chunk = payload.read_nowait(-1)
        reply = Reply(message.code, message.reason, response_headers(message.headers))
        if chunk:
            reply.send_headers_with_body()  # the head and the first events in one send
        self.reply = reply
        self.streaming = True
        self.data = chunk
        try:
            reply.start(self._request)
            reply.send_now(chunk)
        except ConnectionError:
            self._request.protocol.force_close()
