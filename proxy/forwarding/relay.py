"""How bodies cross the proxy: the request body, and the three relay paths of an answer.

The request body is streamed once with a bounded copy for a replay (`RequestBody`).
A target's answer reaches the client by exactly one of three paths, chosen by
`relay_path` and nothing else:

- `complete`: the whole answer (head and body) arrived with the socket read that
  completed its head: it goes to the client in one write (`send_complete`), from that
  socket callback when nothing else is to be done with it (`EarlyReply`), before the
  waiting request task resumes.
- `pushed`: the body is still coming (an event stream, a bulk download, a body that ends
  when the target closes): the head and what arrived go out at once and every later
  piece is written to the client from the upstream socket callback (`Pushed`); when the
  client's write buffer passes its high-water mark, reading from the target pauses
  until it drains.
- `rewritten`: the legacy SSE endpoint's stream (a GET answered with
  `text/event-stream`), whose `endpoint` event may need its URL moved to the proxy: the
  awaited loop reads, rewrites (`sse.EndpointRewriter`) and writes, draining the client.

Chunks are framed for the client in one place (`Reply`, by `wire.chunked`), decoded in
one (llhttp). These never decide anything about credentials or errors, and never hold
more than a bounded buffer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import hdrs

from ..wire.client import UpstreamResponse
from ..wire.reply import Reply
from ..wire.server import InboundRequest
from .rules import REDIRECT_STATUSES, response_fields

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
        # The task streaming the body upstream (the pool's upload task) and whether it is inside
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


COMPLETE, PUSHED, REWRITTEN = "complete", "pushed", "rewritten"
RELAY_PATHS = (COMPLETE, PUSHED, REWRITTEN)


def needs_rewrite(method: str, upstream: UpstreamResponse) -> bool:
    """The legacy SSE endpoint's stream: a GET answered with an event stream."""
    return method == hdrs.METH_GET and (upstream.header(hdrs.CONTENT_TYPE) or "").startswith(
        "text/event-stream")


def relay_path(method: str, upstream: UpstreamResponse) -> str:
    """The one decision of how an answer's body reaches the client."""
    if needs_rewrite(method, upstream):
        return REWRITTEN
    if upstream.complete:
        return COMPLETE
    return PUSHED


class BadHead(Exception):
    """The target's head cannot be passed on safely (a control character): answer 502."""


class Progress:
    """What the access log and `on_complete` need, filled in as the request goes."""

    __slots__ = ("bytes_out", "upstream_status")

    def __init__(self) -> None:
        self.bytes_out = 0
        self.upstream_status: int | None = None


def client_headers(upstream: UpstreamResponse, path: str) -> list[tuple[str, str]]:
    """The head passed on: the target's fields minus hop-by-hop ones (and its length, when
    the body is rewritten)."""
    fields = response_fields(upstream.fields)
    if path == REWRITTEN:  # a rewrite changes the length
        fields = [(n, v) for n, v in fields if n.lower() != "content-length"]
    return fields


def send_complete(request: InboundRequest, upstream: UpstreamResponse,
                  progress: Progress) -> Reply:
    """Path `complete`: head and whole body in one write. Raises BadHead before writing
    anything when the head cannot be passed on."""
    data = upstream.take()
    reply = Reply(upstream.status, upstream.reason, client_headers(upstream, COMPLETE),
                  body=None if request.method == hdrs.METH_HEAD else data)
    reply.send_headers_with_body()
    try:
        reply.start(request)
    except ValueError:
        raise BadHead from None
    progress.bytes_out += len(data)
    reply.send_eof(data)
    return reply


class Pushed:
    """Path `pushed`: the body goes to the client from the upstream socket callback.

    A task wake-up and a coroutine resumption per event would add up, on a burst of
    events from many streams at once, to the tail latency; here each piece is written the
    moment llhttp hands it over. The client's transport says when its buffer passes the
    high-water mark (`client_paused`): reading from the target pauses until it drains, so
    a client that stops reading stalls the target and the proxy holds one window.
    `done` resolves with the outcome: ENDED (cleanly), FAILED (the target broke off: the
    client's connection is dropped so it sees an error, not a clean end) or GONE.
    """

    __slots__ = ("_progress", "_reply", "_request", "_upstream", "done")

    ENDED, FAILED, GONE = "ended", "failed", "gone"

    def __init__(self, request: InboundRequest, upstream: UpstreamResponse, reply: Reply,
                 progress: Progress) -> None:
        self._request = request
        self._upstream = upstream
        self._reply = reply
        self._progress = progress
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @classmethod
    def start(cls, request: InboundRequest, upstream: UpstreamResponse,
              progress: Progress) -> Pushed:
        """Send the head (with whatever body arrived) and take the body over. Raises
        BadHead before writing anything when the head cannot be passed on."""
        first = upstream.take()
        reply = Reply(upstream.status, upstream.reason, client_headers(upstream, PUSHED))
        if first:
            reply.send_headers_with_body()  # the head and the first events in one send
        try:
            reply.start(request)
        except ValueError:
            raise BadHead from None
        pushed = cls(request, upstream, reply, progress)
        request.protocol.write_listener = pushed
        upstream.attach(pushed)
        if first:
            pushed.body([first])
        if upstream.error is not None:
            pushed.fail(upstream.error)
        elif upstream.complete:
            pushed.end()
        elif request.protocol.writing_paused:
            upstream.pause()
        return pushed

    @property
    def reply(self) -> Reply:
        return self._reply

    def body(self, pieces: list[bytes]) -> None:
        if self.done.done():
            return
        try:
            self._progress.bytes_out += self._reply.send_pieces(pieces)
        except ConnectionError:
            self._finish(self.GONE)

    def end(self) -> None:
        if self.done.done():
            return
        try:
            self._reply.send_eof()
        except ConnectionError:
            self._finish(self.GONE)
            return
        self._finish(self.ENDED)

    def fail(self, exc: BaseException) -> None:
        self._finish(self.FAILED)

    def client_paused(self) -> None:
        self._upstream.pause()

    def client_resumed(self) -> None:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            self._finish(self.GONE)
            return
        self._upstream.resume()

    def _finish(self, outcome: str) -> None:
        if not self.done.done():
            self.done.set_result(outcome)
        self._upstream.sink = None
        if outcome != self.ENDED:
            self._request.protocol.force_close()


class EarlyReply:
    """Answers the client from the upstream socket callback, before the waiting request
    task resumes through its coroutine frames: the client's latency no longer waits.

    Paths `complete` and `pushed` start here; the task does everything else after
    (observers, pooling, the access event). Answers the handler may still act on (a
    redirect to follow, a 401 to refresh and replay or to replace, a 403 to replace) and
    the `rewritten` path are left to it, as is a head that cannot be passed on (the
    handler answers 502).
    """

    __slots__ = ("_hold_auth", "_progress", "_refreshable", "_request", "path", "pushed",
                 "reply")

    def __init__(self, request: InboundRequest, progress: Progress, *, refreshable: bool,
                 hold_auth: bool) -> None:
        self._request = request
        self._refreshable = refreshable
        self._hold_auth = hold_auth  # 401 and 403 are the handler's to replace
        self._progress = progress
        self.path: str | None = None
        self.reply: Reply | None = None
        self.pushed: Pushed | None = None

    def __call__(self, upstream: UpstreamResponse) -> None:
        status = upstream.status
        if status in REDIRECT_STATUSES or (status == 401 and self._refreshable) or (
                self._hold_auth and status in (401, 403)):
            return
        path = relay_path(self._request.method, upstream)
        try:
            if path == COMPLETE:
                self.reply = send_complete(self._request, upstream, self._progress)
            elif path == PUSHED:
                self.pushed = Pushed.start(self._request, upstream, self._progress)
                self.reply = self.pushed.reply
            else:
                return
        except BadHead:
            return
        except ConnectionError:
            self._request.protocol.force_close()  # the client left: nothing more to send
        self.path = path
