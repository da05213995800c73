"""A tiny raw-socket HTTP/1.1 client: hostile bytes go out exactly as written."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

from helpers import WAIT


@dataclass
class RawAnswer:
    status: int
    head: bytes
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_until_closed(reader: asyncio.StreamReader, limit: int = 1 << 20) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionError):
        while len(data) < limit and (chunk := await reader.read(65536)):
            data += chunk
    return data


def parse(raw: bytes) -> RawAnswer | None:
    """The first response in `raw`, or None when nothing (or no full head) came back."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1."):
        return None
    status = int(head.split(b" ", 2)[1])
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = rest[:length] if length is not None else rest
    return RawAnswer(status, head, body)


async def exchange(port: int, data: bytes, *, wait: float = WAIT) -> bytes:
    """Send `data`, then read until the proxy closes the connection (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(data)
            await writer.drain()
        return await asyncio.wait_for(read_until_closed(reader), wait)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def request(port: int, head_lines: list[str], body: bytes = b"",
                  method: str = "GET", target: str = "/mcp") -> RawAnswer | None:
    """One request with `Connection: close`; the answer parsed, or None when cut off."""
    lines = [f"{method} {target} HTTP/1.1", *head_lines, "Connection: close"]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    return parse(await exchange(port, raw))


async def get_ok(port: int, path: str = "/mcp") -> RawAnswer:
    """A plain request that must succeed: the proxy is still serving."""
    answer = await request(port, ["Host: 127.0.0.1"], target=path)
    assert answer is not None, "the proxy stopped answering"
    assert answer.status == 200, answer.head
    return answer
