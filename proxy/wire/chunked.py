"""Chunked transfer framing, checked and passed on: pure, no I/O.

Event streams and bulk downloads cross the proxy as the target framed them
(`ChunkedPassthrough`): this checks that framing by positions as the bytes come off the
socket, so the bytes themselves can go on unchanged, and says where a body starts in
what a connection received. Malformed framing raises ValueError.
"""

from __future__ import annotations

import re

from .limits import MAX_CHUNK_LINE

_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class ChunkedPassthrough:
    """The target's chunked framing, checked and passed on to a chunked client.

    Pure: `feed()` takes bytes as they came off the upstream socket and returns the bytes
    to write to the client. The framing is checked by positions only and the target's
    bytes go on unchanged, framing and all: no copy for an event or a bulk body, however
    the reads cut the chunks. Held back: the last chunk and any trailers (consumed,
    never passed on: the writer ends the client's message itself), and a size line cut
    by a read (it goes on with the next piece, once it is known not to be the last
    chunk). A size line with extensions or whitespace is re-framed as a bare size.
    Malformed framing raises ValueError; nothing after the end is looked at.
    """

    __slots__ = ("_hide", "_left", "_line", "_state", "done", "payload_bytes", "trailing")

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self) -> None:
        self._state = self._SIZE
        self._hide = False  # the CRLF ending the current chunk is not passed on (`resume`)
        self._line = b""  # a size or trailer line cut by a read, held back
        self._left = 0  # payload bytes (or CRLF bytes) still due in the current chunk
        self.done = False
        self.payload_bytes = 0
        self.trailing = False  # bytes came after the end: the connection is not reusable

    def feed(self, data: bytes) -> bytes:
        if self.done:
            self.trailing = self.trailing or bool(data)
            return b""
        if self._state == self._SIZE and not self._line:
            # Fast path, the usual event: exactly one whole chunk with a bare hex size.
            cut = data.find(b"\r\n")
            if 0 < cut <= 16 and _HEX.fullmatch(data, 0, cut) is not None:
                size = int(data[:cut], 16)
                if size and len(data) == cut + size + 4 and data.endswith(b"\r\n"):
                    self.payload_bytes += size
                    return data
        if self._line:
            data = self._line + data  # rare: only a read that cut a size line
            self._line = b""
        state, left = self._state, self._left
        pos, end = 0, len(data)
        stop = 0 if state == self._TRAILER else end  # where passing on stops
        start = 0  # data[start:stop] goes on as it came
        out: list[bytes] | None = None  # pieces before `start`, once one was re-framed
        payload = 0
        while pos < end:
            if state == self._DATA:
                take = end - pos if left > end - pos else left
                pos += take
                left -= take
                payload += take
                if not left:
                    state, left = self._DATA_END, 2
            elif state == self._DATA_END:
                if left == 2:
                    if data[pos] != 13:
                        raise ValueError("chunk data not followed by CRLF")
                    pos += 1
                    left = 1
                    if pos == end:
                        break
                if data[pos] != 10:
                    raise ValueError("chunk data not followed by CRLF")
                pos += 1
                state = self._SIZE
                if self._hide:
                    self._hide = False
                    start = pos
            else:
                cut = data.find(b"\n", pos)
                if cut < 0:
                    if end - pos > MAX_CHUNK_LINE:
                        raise ValueError("chunk size or trailer line too long")
                    self._line = data[pos:]
                    if state == self._SIZE:
                        stop = pos
                    break
                if cut == pos or data[cut - 1] != 13:
                    raise ValueError("bare LF in chunk framing")
                if state == self._TRAILER:
                    if cut == pos + 1:  # the empty line: the end of the message
                        self.done = True
                        self.trailing = cut + 1 < end
                        break
                    pos = cut + 1
                    continue
                size_end = cut - 1
                if _HEX.fullmatch(data, pos, size_end) is not None:
                    size = int(data[pos:size_end], 16)
                    clean = True
                else:
                    size_text = data[pos:size_end].split(b";", 1)[0].rstrip(b" \t")
                    if _HEX.fullmatch(size_text) is None:
                        raise ValueError("malformed chunk size")
                    size = int(size_text, 16)
                    clean = False
                if not size:
                    stop = pos  # the last chunk: the writer ends the client's message
                    state = self._TRAILER
                elif not clean:
                    if out is None:
                        out = []
                    out.append(data[start:pos])
                    out.append(b"%x\r\n" % size)
                    start = cut + 1
                    state, left = self._DATA, size
                else:
                    state, left = self._DATA, size
                pos = cut + 1
        self._state, self._left = state, left
        self.payload_bytes += payload
        if out is not None:
            out.append(data[start:stop])
            return b"".join(out)
        if self._hide:  # only part of the hidden CRLF came
            return b""
        return data if stop == end and not start else data[start:stop]

    def resume(self) -> bytes:
        """Take over from another parser that stopped where `decode` did, its payload
        passed on as whole chunks: the framing to send the client before the target's
        next bytes go on unchanged (a size line for the rest of a chunk cut short)."""
        if self._state == self._DATA:
            return b"%x\r\n" % self._left
        if self._state == self._DATA_END:
            self._hide = True
        return b""

    def decode(self, data: bytes) -> bytes:
        """The payload in `data` (no framing); the same state as `feed`."""
        if self.done:
            self.trailing = self.trailing or bool(data)
            return b""
        pieces = self._parse(data)
        payload = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self.payload_bytes += len(payload)
        return payload

    def _parse(self, data: bytes) -> list[bytes]:
        pieces: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end and not self.done:
            state = self._state
            if state == self._DATA:
                take = min(self._left, end - pos)
                pieces.append(data[pos:pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._state, self._left = self._DATA_END, 2
            elif state == self._DATA_END:
                take = min(self._left, end - pos)
                if data[pos:pos + take] != b"\r\n"[2 - self._left:2 - self._left + take]:
                    raise ValueError("chunk data not followed by CRLF")
                pos += take
                self._left -= take
                if not self._left:
                    self._state = self._SIZE
            else:
                cut = data.find(b"\n", pos)
                if cut < 0:
                    self._line += data[pos:]
                    if len(self._line) > MAX_CHUNK_LINE:
                        raise ValueError("chunk size or trailer line too long")
                    break
                line, self._line = self._line + data[pos:cut + 1], b""
                pos = cut + 1
                if not line.endswith(b"\r\n"):
                    raise ValueError("bare LF in chunk framing")
                line = line[:-2]
                if state == self._TRAILER:
                    if not line:
                        self.done = True
                        self.trailing = pos < end
                    continue
                size_text = line.split(b";", 1)[0].rstrip(b" \t")
                if _HEX.fullmatch(size_text) is None:
                    raise ValueError("malformed chunk size")
                size = int(size_text, 16)
                if size:
                    self._state, self._left = self._DATA, size
                else:
                    self._state = self._TRAILER
        return pieces



def body_start(raw: bytes) -> int:
    """Where the body begins in bytes received for one response, or -1."""
    cut = raw.find(b"\r\n\r\n")
    return cut + 4 if cut >= 0 else -1
