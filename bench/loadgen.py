"""The benchmark's load generator: a raw-asyncio HTTP/1.1 keep-alive client in its own process.

bench.py runs one subcommand at a time and reads a JSON line from stdout:

- ``rps``: C keep-alive connections POST a JSON-RPC call back to back for a fixed time
  (and at most ``--max-requests``); request rate and latency percentiles.
- ``sse``: N concurrent SSE streams; per event, receive time minus the upstream's
  send stamp; every event must arrive.
- ``big``: one large GET read into a 256 KiB buffer; MB/s.
- ``hold``: N idle SSE streams held open; prints ``READY {...}``, waits for a line on
  stdin (or ``--max-hold``), hangs up on all of them, prints ``DONE``.

It is raw asyncio rather than an HTTP library so that the client costs as little CPU as
possible and the proxy, not the client, is what the numbers show. It only talks to
loopback URLs and every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

RPC_BODY = (b'{"jsonrpc":"2.0","id":42,"method":"tools/call",'
            b'"params":{"name":"echo","arguments":{}}}')
READ_LIMIT = 1 << 20
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str  # path plus query


def parse_target(url: str) -> Target:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK:
        raise SystemExit(f"loadgen only talks to http://127.0.0.1 (got {url})")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.hostname, parts.port or 80, path)


def build_request(method: str, target: Target, extra: Sequence[tuple[str, str]] = (),
                  body: bytes = b"", close: bool = False) -> bytes:
    """One HTTP/1.1 request, serialised once and reused for every send."""
    lines = [f"{method} {target.path} HTTP/1.1", f"Host: {target.host}:{target.port}"]
    if method == "POST":
        lines += ["Content-Type: application/json",
                  "Accept: application/json, text/event-stream",
                  f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in extra]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


@dataclass
class Head:
    status: int
    length: int | None  # Content-Length, or None
    chunked: bool
    close: bool


def parse_head(raw: bytes) -> Head:
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, chunked, close = None, False, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value
        elif name == "connection":
            close = "close" in value
    return Head(status, length, chunked, close)


async def read_head(reader: asyncio.StreamReader) -> Head:
    return parse_head(await reader.readuntil(b"\r\n\r\n"))


async def iter_body(reader: asyncio.StreamReader, head: Head,
                    piece: int = 256 * 1024) -> AsyncIterator[bytes]:
    """The response body in pieces: Content-Length, chunked, or until EOF."""
    if head.chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers expected
                return
            while size > 0:
                data = await reader.read(min(size, piece))
                if not data:
                    raise ConnectionError("connection closed inside a chunk")
                size -= len(data)
                yield data
            await reader.readexactly(2)
    elif head.length is not None:
        left = head.length
        while left > 0:
            data = await reader.read(min(left, piece))
            if not data:
                raise ConnectionError("connection closed inside the body")
            left -= len(data)
            yield data
    else:
        while data := await reader.read(piece):
            yield data


async def connect(target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(target.host, target.port, limit=READ_LIMIT)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 1)


# ------------------------------------------------------------------ rps
@dataclass
class RpsState:
    deadline: float
    max_requests: int
    started: int = 0
    errors: int = 0
    first_error: str | None = None


async def rps_connection(target: Target, request: bytes, state: RpsState,
                         latencies: list[int]) -> None:
    reader, writer = await connect(target)
    try:
        while time.monotonic() < state.deadline and state.started < state.max_requests:
            state.started += 1
            t0 = time.perf_counter_ns()
            writer.write(request)
            head = await read_head(reader)
            async for _ in iter_body(reader, head):
                pass
            latencies.append(time.perf_counter_ns() - t0)
            if head.status != 200:
                state.errors += 1
                state.first_error = state.first_error or f"status {head.status}"
            if head.close:
                await close(writer)
                reader, writer = await connect(target)
    finally:
        await close(writer)


async def run_rps(args: argparse.Namespace) -> dict[str, object]:
    target = parse_target(args.url)
    request = build_request("POST", target, body=RPC_BODY)
    state = RpsState(time.monotonic() + args.seconds, args.max_requests)
    latencies: list[int] = []
    t0 = time.perf_counter()
    tasks = [rps_connection(target, request, state, latencies) for _ in range(args.conns)]
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True),
                                     args.seconds + 30)
    elapsed = time.perf_counter() - t0
    for r in results:
        if isinstance(r, BaseException):
            state.errors += 1
            state.first_error = state.first_error or repr(r)
    latencies.sort()
    return {"requests": len(latencies), "seconds": elapsed, "rps": len(latencies) / elapsed,
            "p50_us": percentile(latencies, 50) / 1000, "p99_us": percentile(latencies, 99) / 1000,
            "errors": state.errors, "first_error": state.first_error}


# ------------------------------------------------------------------ sse
def sse_headers(events: int, interval_ms: int, hold_ms: int = 0,
                tag: str = "") -> list[tuple[str, str]]:
    extra = [("X-Bench-Stream", str(events)), ("X-Bench-Interval-Ms", str(interval_ms))]
    if hold_ms:
        extra.append(("X-Bench-Hold-Ms", str(hold_ms)))
    if tag:
        extra.append(("X-Bench-Tag", tag))
    return extra


def event_stamps(buffer: bytearray) -> list[int]:
    """Send stamps of the complete events at the front of `buffer`, which loses them."""
    stamps = []
    while (end := buffer.find(b"\n\n")) >= 0:
        block = bytes(buffer[:end])
        del buffer[:end + 2]
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                stamps.append(int(json.loads(line[5:])["ts"]))
    return stamps


async def sse_stream(target: Target, request: bytes, delays: list[int]) -> int:
    """Reads one stream to its end; returns the number of events received."""
    reader, writer = await connect(target)
    count = 0
    try:
        writer.write(request)
        head = await read_head(reader)
        if head.status != 200:
            raise ConnectionError(f"status {head.status}")
        buffer = bytearray()
        async for data in iter_body(reader, head, piece=64 * 1024):
            now = time.time_ns()
            buffer += data
            for stamp in event_stamps(buffer):
                delays.append(now - stamp)
                count += 1
    finally:
        await close(writer)
    return count


async def run_sse(args: argparse.Namespace) -> dict[str, object]:
    target = parse_target(args.url)
    request = build_request("POST", target, sse_headers(args.events, args.interval_ms),
                            RPC_BODY)
    delays: list[int] = []
    tasks = [sse_stream(target, request, delays) for _ in range(args.streams)]
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), args.timeout)
    errors = [r for r in results if isinstance(r, BaseException)]
    delays.sort()
    return {"events": len(delays), "expected": args.events * args.streams,
            "p50_us": percentile(delays, 50) / 1000, "p99_us": percentile(delays, 99) / 1000,
            "max_us": delays[-1] / 1000 if delays else float("nan"),
            "errors": len(errors), "first_error": repr(errors[0]) if errors else None}


# ------------------------------------------------------------------ big
async def run_big(args: argparse.Namespace) -> dict[str, object]:
    target = parse_target(args.url)
    reader, writer = await connect(target)
    received = 0
    t0 = time.perf_counter()
    try:
        writer.write(build_request("GET", target, close=True))

        async def drain() -> Head:
            nonlocal received
            head = await read_head(reader)
            async for data in iter_body(reader, head):
                received += len(data)
            return head

        head = await asyncio.wait_for(drain(), args.timeout)
    finally:
        await close(writer)
    elapsed = time.perf_counter() - t0
    ok = head.status == 200 and received == args.bytes
    return {"bytes": received, "seconds": elapsed, "mbps": received / elapsed / 1e6,
            "errors": 0 if ok else 1,
            "first_error": None if ok else f"status {head.status}, {received} bytes"}


# ------------------------------------------------------------------ hold
async def open_held(target: Target, request: bytes,
                    held: list[asyncio.StreamWriter]) -> None:
    reader, writer = await connect(target)
    try:
        writer.write(request)
        head = await read_head(reader)
        if head.status != 200:
            raise ConnectionError(f"status {head.status}")
        # The first event proves the stream is live end to end; then it idles.
        await reader.readuntil(b"\n\n")
    except BaseException:
        await close(writer)
        raise
    held.append(writer)


async def run_hold(args: argparse.Namespace) -> dict[str, object]:
    target = parse_target(args.url)
    request = build_request("POST", target, sse_headers(1, 0, args.hold_ms, args.tag), RPC_BODY)
    held: list[asyncio.StreamWriter] = []
    failed, first_error = 0, None
    gate = asyncio.Semaphore(64)  # listen backlogs are small: open in waves

    async def one() -> None:
        nonlocal failed, first_error
        async with gate:
            try:
                await asyncio.wait_for(open_held(target, request, held), args.open_timeout)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                failed += 1
                first_error = first_error or repr(exc)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(args.n)))
    ready = {"open": len(held), "failed": failed, "first_error": first_error,
             "open_ms": round((time.perf_counter() - t0) * 1000)}
    print("READY " + json.dumps(ready), flush=True)
    # A reader callback rather than a thread: a thread blocked in readline() would keep
    # the process alive after --max-hold.
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), release.set)
    try:
        await asyncio.wait_for(release.wait(), args.max_hold)
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(sys.stdin.fileno())
    for writer in held:
        writer.transport.abort()  # hang up at once, as a killed client would
    return {"closed": len(held)}


# ------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    rps = sub.add_parser("rps")
    rps.add_argument("--url", required=True)
    rps.add_argument("--conns", type=int, default=64)
    rps.add_argument("--seconds", type=float, default=3)
    rps.add_argument("--max-requests", type=int, default=10_000_000)
    sse = sub.add_parser("sse")
    sse.add_argument("--url", required=True)
    sse.add_argument("--streams", type=int, default=1)
    sse.add_argument("--events", type=int, default=200)
    sse.add_argument("--interval-ms", type=int, default=10)
    sse.add_argument("--timeout", type=float, default=60)
    big = sub.add_parser("big")
    big.add_argument("--url", required=True)
    big.add_argument("--bytes", type=int, required=True)
    big.add_argument("--timeout", type=float, default=90)
    hold = sub.add_parser("hold")
    hold.add_argument("--url", required=True)
    hold.add_argument("--n", type=int, default=1000)
    hold.add_argument("--tag", required=True)
    hold.add_argument("--hold-ms", type=int, default=30_000)
    hold.add_argument("--open-timeout", type=float, default=20)
    hold.add_argument("--max-hold", type=float, default=60)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runners = {"rps": run_rps, "sse": run_sse, "big": run_big, "hold": run_hold}
    result = asyncio.run(runners[args.mode](args))
    print(("DONE " if args.mode == "hold" else "") + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
