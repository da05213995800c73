"""The benchmark's MCP-like upstream: a small aiohttp app that bench.py runs in its own process.

It answers like a remote MCP server would, with knobs the benchmark needs:

- ``POST`` (any path): a JSON-RPC result padded to ``--resp-bytes`` (1 KiB), id echoed;
  ``X-Bench-Stream: N`` turns the answer into an SSE stream of N ``message`` events,
  ``X-Bench-Interval-Ms`` apart, each stamped with its send time (``"ts"``, unix ns, taken
  right before the write) and flushed; ``X-Bench-Hold-Ms`` keeps the stream open and idle
  afterwards (``X-Bench-Tag`` labels it for ``/stats``).
- ``GET /big?bytes=N``: N bytes, chunked, in 64 KiB writes (``&chunk=`` to change).
- ``GET /stats?tag=T``: requests served, streams open, streams open carrying tag T.

Every answer says in ``X-Bench-Auth`` whether the request carried a bearer credential, so
the benchmark can check that the proxy injected one. It binds loopback only, never logs
request headers (they carry the proxy's credential), and ends every held stream after
``--max-hold-ms`` so nothing it serves can run unbounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import hdrs, web

CHUNK = 64 * 1024
FILLER = b"x" * CHUNK


@dataclass
class Stats:
    """Counters behind /stats; one instance per process."""

    requests: int = 0
    open_streams: int = 0
    open_by_tag: Counter[str] = field(default_factory=Counter)


STATS_KEY = web.AppKey("stats", Stats)
RESP_BYTES_KEY = web.AppKey("resp_bytes", int)
MAX_HOLD_KEY = web.AppKey("max_hold_s", float)


def header_int(request: web.Request, name: str, default: int) -> int:
    """An integer knob from a header, falling back to `default` when absent or malformed."""
    try:
        return max(0, int(request.headers.get(name, default)))
    except ValueError:
        return default


def rpc_result(rpc_id: object, size: int) -> bytes:
    """A JSON-RPC response of about `size` bytes (the padding is inside the result)."""
    head = {"jsonrpc": "2.0", "id": rpc_id, "result": {"content": [], "pad": ""}}
    pad = max(0, size - len(json.dumps(head, separators=(",", ":"))))
    head["result"] = {"content": [], "pad": "x" * pad}
    return json.dumps(head, separators=(",", ":")).encode()


def sse_event(rpc_id: object, seq: int, last: bool) -> bytes:
    """One SSE `message` event stamped with the send time; the last one is the RPC result."""
    body: dict[str, object] = {"jsonrpc": "2.0", "seq": seq, "ts": time.time_ns()}
    if last:
        body["id"] = rpc_id
        body["result"] = {"content": []}
    else:
        body["method"] = "notifications/progress"
    return b"event: message\ndata: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def bench_headers(request: web.Request) -> dict[str, str]:
    auth = request.headers.get(hdrs.AUTHORIZATION, "")
    return {"X-Bench-Auth": "bearer" if auth.lower().startswith("bearer ") else "none"}


async def handle_post(request: web.Request) -> web.StreamResponse:
    stats = request.app[STATS_KEY]
    stats.requests += 1
    raw = await request.read()
    try:
        rpc_id = json.loads(raw).get("id")
    except (ValueError, AttributeError):
        rpc_id = None
    events = header_int(request, "X-Bench-Stream", 0)
    if events == 0:
        if rpc_id is None:
            return web.Response(status=202, headers=bench_headers(request))
        return web.Response(body=rpc_result(rpc_id, request.app[RESP_BYTES_KEY]),
                            content_type="application/json", headers=bench_headers(request))
    return await stream_events(request, rpc_id, events)


async def stream_events(request: web.Request, rpc_id: object, events: int) -> web.StreamResponse:
    stats = request.app[STATS_KEY]
    interval = header_int(request, "X-Bench-Interval-Ms", 10) / 1000
    hold = min(header_int(request, "X-Bench-Hold-Ms", 0) / 1000, request.app[MAX_HOLD_KEY])
    tag = request.headers.get("X-Bench-Tag", "")
    headers = {hdrs.CONTENT_TYPE: "text/event-stream", hdrs.CACHE_CONTROL: "no-cache",
               **bench_headers(request)}
    response = web.StreamResponse(headers=headers)
    stats.open_streams += 1
    stats.open_by_tag[tag] += 1
    try:
        await response.prepare(request)
        for seq in range(events):
            if seq:
                await asyncio.sleep(interval)
            await response.write(sse_event(rpc_id, seq, last=seq == events - 1 and not hold))
        await hold_idle(request, hold)
        return response
    finally:
        # Runs on a normal end and on the cancellation a client hang-up causes.
        stats.open_streams -= 1
        stats.open_by_tag[tag] -= 1
        if not stats.open_by_tag[tag]:
            del stats.open_by_tag[tag]


async def hold_idle(request: web.Request, seconds: float) -> None:
    """Stay open without writing until `seconds` pass or the peer goes away."""
    deadline = time.monotonic() + seconds
    # Handler cancellation normally ends us on hang-up; polling the transport is the
    # fallback that keeps /stats truthful even if it did not.
    while time.monotonic() < deadline:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


async def handle_big(request: web.Request) -> web.StreamResponse:
    request.app[STATS_KEY].requests += 1
    try:
        total = int(request.query.get("bytes", "0"))
        chunk = int(request.query.get("chunk", CHUNK))
    except ValueError:
        raise web.HTTPBadRequest(text="bytes and chunk must be integers") from None
    chunk = max(1, min(chunk, 1 << 24))
    piece = FILLER if chunk == CHUNK else b"x" * chunk
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "application/octet-stream",
                                           **bench_headers(request)})
    response.enable_chunked_encoding()
    await response.prepare(request)
    left = total
    while left > 0:
        await response.write(piece if left >= chunk else piece[:left])
        left -= chunk
    await response.write_eof()
    return response


async def handle_stats(request: web.Request) -> web.Response:
    stats = request.app[STATS_KEY]
    tag = request.query.get("tag", "")
    return web.json_response({"requests": stats.requests, "open_streams": stats.open_streams,
                              "open_streams_tag": stats.open_by_tag.get(tag, 0) if tag else None})


def make_app(resp_bytes: int = 1024, max_hold_s: float = 60.0) -> web.Application:
    app = web.Application()
    app[STATS_KEY] = Stats()
    app[RESP_BYTES_KEY] = resp_bytes
    app[MAX_HOLD_KEY] = max_hold_s
    app.router.add_get("/stats", handle_stats)
    app.router.add_get("/big", handle_big)
    app.router.add_post("/{tail:.*}", handle_post)
    return app


async def serve(port: int, resp_bytes: int, max_hold_s: float) -> None:
    # handler_cancellation: a client hanging up cancels its handler, as a real server's
    # would, so /stats counts only streams somebody is still connected to.
    runner = web.AppRunner(make_app(resp_bytes, max_hold_s), handler_cancellation=True,
                           access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    sockets = runner.addresses
    print(f"http://127.0.0.1:{sockets[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 = a free port (printed)")
    parser.add_argument("--resp-bytes", type=int, default=1024)
    parser.add_argument("--max-hold-ms", type=int, default=60_000)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.resp_bytes, args.max_hold_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
