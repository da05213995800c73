"""Rewriting the legacy HTTP+SSE transport's `endpoint` event so clients post back via us.

The legacy MCP transport opens with `event: endpoint` whose data is the URL the client
must POST its messages to. A relative URL already resolves against the proxy; an
absolute one on the target's origin would send the client (and its traffic) straight
to the target, so it is moved to the proxy's origin. Everything else in the stream
passes byte for byte. The rewriter only looks at a bounded prefix of the stream (the
first few events, at most MAX_BYTES_INSPECTED bytes), each byte once, then becomes a
pass-through: a long Streamable-HTTP stream, or a first event of any size, costs
nothing more. It must never hold more than that prefix, never scan a byte twice, and
never limit the length of a line (a long one is passed on, not refused).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from yarl import URL

ENDPOINT_EVENT = b"endpoint"
# After this many events without an `endpoint` event none is coming (it is the first
# thing a legacy server sends); stop parsing.
MAX_EVENTS_INSPECTED = 4
# The endpoint event is a URL of a few hundred bytes. A stream that has not shown one
# within this many bytes is not going to (or it comes too late for any client): the
# rewriter stops holding and scanning, and the rest, an unfinished event included,
# streams through as it comes. Bounds both the bytes held and the CPU spent per stream.
MAX_BYTES_INSPECTED = 64 * 1024


def rewrite_endpoint_url(value: str, target_origin: URL, proxy_origin: str) -> str:
    """The endpoint URL a client should use: absolute URLs on the target move to us.

    Relative URLs (`/messages?session_id=1`, `messages`) are returned unchanged: the
    client resolves them against the proxy URL it connected to. URLs on any other origin
    are left alone too: they are not the target's to rewrite.
    """
    stripped = value.strip()
    if not stripped.startswith("//") and "://" not in stripped[:16]:
        return value
    if stripped.startswith("//"):  # scheme-relative: the stream's scheme is the target's
        stripped = f"{target_origin.scheme}:{stripped}"
    try:
        url = URL(stripped, encoded=True)
        same = url.origin() == target_origin
    except ValueError:
        return value
    if not same:
        return value
    # Everything after the authority, as sent (yarl would drop an empty `?` or `#`).
    authority_on = stripped.split("//", 1)[1]
    cut = min((i for i in map(authority_on.find, "/?#") if i >= 0), default=len(authority_on))
    rest = authority_on[cut:]
    if rest[:1] in ("?", "#"):
        rest = "/" + rest
    return proxy_origin + rest


_LINE_BREAK = re.compile(rb"[\r\n]")


def _line_end(buf: bytearray, start: int, end: int) -> tuple[int, int] | None:
    """(end of line, start of next line) for the first line from `start`, if it ends
    before `end`. One scan, stopping at the first CR or LF."""
    found = _LINE_BREAK.search(buf, start, end)
    if found is None:
        return None
    at = found.start()
    if buf[at] == 0x0A:
        return at, at + 1
    if at + 1 == len(buf):
        return None  # a lone CR at the end may be half of a CRLF
    return at, at + 2 if buf[at + 1] == 0x0A else at + 1


class EndpointRewriter:
    """A streaming transformer: `feed` each chunk, send what it returns, `flush` at the end."""

    __slots__ = ("_buf", "_event_start", "_events", "_offset", "_on_endpoint",
                 "_passthrough", "_proxy_origin", "_scan", "_skip_lf", "_target_origin")

    def __init__(self, target_origin: URL, proxy_origin: str,
                 on_endpoint: Callable[[str], None] | None = None) -> None:
        """`on_endpoint` hears the announced URL (as the target sent it) before the
        event goes on to the client."""
        self._target_origin = target_origin
        self._proxy_origin = proxy_origin
        self._on_endpoint = on_endpoint
        self._buf = bytearray()
        self._event_start = 0  # where the current (not yet ended) event begins in _buf
        self._scan = 0  # where scanning resumes in _buf: the first line not yet complete
        self._offset = 0  # stream bytes before _buf[0] (passed on already)
        self._events = 0
        self._passthrough = False
        self._skip_lf = False  # the last event ended on a CR that may be half of a CRLF

    @property
    def passthrough(self) -> bool:
        """True once the rewriter has stopped looking: chunks now pass untouched."""
        return self._passthrough

    def feed(self, chunk: bytes) -> bytes:
        if self._passthrough:
            return chunk
        out = bytearray()
        if self._skip_lf:
            self._skip_lf = False
            if chunk.startswith(b"\n"):  # the LF of that CRLF: not another blank line
                out += b"\n"
                chunk = chunk[1:]
        buf = self._buf
        buf += chunk
        pos = self._scan
        # Nothing past the budget is ever scanned: a line that does not end within it
        # turns the rewriter into a pass-through below.
        budget = MAX_BYTES_INSPECTED - self._offset
        limit = min(len(buf), budget)
        while not self._passthrough and pos < limit:
            found = _line_end(buf, pos, limit)
            if found is None:
                if pos != len(buf) - 1 or buf[pos] != 0x0D:
                    break
                # A blank line ended by the CR that closes what has arrived: the event is
                # complete whether or not an LF follows, so it is not held back until the
                # target sends more (a legacy server sends `endpoint`, then waits).
                found = (pos, pos + 1)
                self._skip_lf = True
            end, nxt = found
            if end == pos:  # a blank line: the event is complete
                out += self._finish_event(bytes(buf[self._event_start:nxt]),
                                          end - self._event_start)
                self._event_start = nxt
            pos = nxt
        self._scan = pos
        if not self._passthrough and len(buf) > budget:
            # No endpoint event in the first MAX_BYTES_INSPECTED bytes: stop looking, and
            # let an unfinished (maybe huge) event go on as it comes.
            self._passthrough = True
        if self._passthrough:
            out += buf[self._event_start:]
            self._buf = bytearray()
            self._event_start = self._scan = 0
        elif self._event_start:
            start = self._event_start
            del buf[:start]
            self._offset += start
            self._scan -= start
            self._event_start = 0
        return bytes(out)

    def flush(self) -> bytes:
        """Whatever is still held (an unterminated last event), unchanged."""
        rest = bytes(self._buf)
        self._buf = bytearray()
        self._passthrough = True
        return rest

    def _finish_event(self, raw: bytes, body_len: int) -> bytes:
        """`raw` is one event including its blank line; its field lines are raw[:body_len]."""
        self._events += 1
        body = raw[:body_len]
        if self._is_endpoint(body):
            self._passthrough = True
            return self._rewrite(body) + raw[body_len:]
        if self._events >= MAX_EVENTS_INSPECTED:
            self._passthrough = True
        return raw

    @staticmethod
    def _lines(body: bytes) -> list[bytes]:
        """Field lines with their terminators, in order."""
        lines: list[bytes] = []
        buf = bytearray(body)
        pos = 0
        while pos < len(buf):
            found = _line_end(buf, pos, len(buf))
            nxt = len(buf) if found is None else found[1]
            if found is None and buf.endswith(b"\r"):
                nxt = len(buf)
            lines.append(bytes(buf[pos:nxt]))
            pos = nxt
        return lines

    @staticmethod
    def _field(line: bytes) -> tuple[bytes, bytes, bytes]:
        """(name, value, terminator) of one field line per the SSE grammar."""
        content = line.rstrip(b"\r\n")
        term = line[len(content):]
        name, sep, value = content.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        return name, value, term

    def _is_endpoint(self, body: bytes) -> bool:
        if ENDPOINT_EVENT not in body:
            return False
        kind = b"message"
        for line in self._lines(body):
            name, value, _ = self._field(line)
            if name == b"event":
                kind = value
        return kind == ENDPOINT_EVENT

    def _rewrite(self, body: bytes) -> bytes:
        lines = self._lines(body)
        data_at = [i for i, line in enumerate(lines) if self._field(line)[0] == b"data"]
        if len(data_at) != 1:
            return body  # not the one-line URL the legacy transport sends: leave it be
        i = data_at[0]
        _, value, term = self._field(lines[i])
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            return body
        if self._on_endpoint is not None:
            self._on_endpoint(text)
        new = rewrite_endpoint_url(text, self._target_origin, self._proxy_origin)
        if new == text:
            return body
        lines[i] = b"data: " + new.encode("utf-8") + term
        return b"".join(lines)
