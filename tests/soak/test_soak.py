"""Soak: 100,000 requests and 2,000 concurrent SSE streams through a real proxy process.

Kept out of the default run (marker `soak`); run it with
`.venv/bin/python -m pytest -m soak tests/soak -s` to see the figures. The proxy (a CLI
subprocess) and the target (a subprocess too, so the load generator has this process to
itself) run on loopback. The proxy's RSS and open file descriptors are read from
/proc/PID at the start, at their peak and at the end: after every client has gone, they
must be back where they were (descriptors) or close to it (memory: no growth between
two identical rounds, which is what a leak would show).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from helpers import SLOW_WAIT

pytestmark = [pytest.mark.soak, pytest.mark.timeout(1200)]

REQUESTS = 100_000
STREAMS = 2_000
CONCURRENCY = 64
ROUNDS = 2  # each round: half the requests, then all the streams

TARGET = textwrap.dedent("""
    import asyncio, sys
    from aiohttp import web

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/sse":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b"data: open\\n\\n")
            await asyncio.sleep(3600)  # until the client leaves (handler cancellation)
            return resp
        body = await request.read()
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {"n": len(body)}})

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


@dataclass
class Sample:
    rss_kib: int
    fds: int


@dataclass
class Meter:
    pid: int
    samples: list[Sample] = field(default_factory=list)

    def take(self) -> Sample:
        rss = 0
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        sample = Sample(rss, len(os.listdir(f"/proc/{self.pid}/fd")))
        self.samples.append(sample)
        return sample

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.take()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    @property
    def peak(self) -> Sample:
        return Sample(max(s.rss_kib for s in self.samples), max(s.fds for s in self.samples))


def _log_file(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:]


async def spawn(args: list[str], stderr_path: Path) -> tuple[asyncio.subprocess.Process, str]:
    """Start a process whose stderr goes to a file (a pipe nobody reads would fill up)."""
    err = _log_file(stderr_path)
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
    finally:
        os.close(err)
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), SLOW_WAIT)).decode().strip()
    assert line, _tail(stderr_path)
    return proc, line


async def stop(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> int:
    if proc.returncode is None:
        proc.send_signal(sig)
    try:
        return await asyncio.wait_for(proc.wait(), SLOW_WAIT)
    except TimeoutError:
        proc.kill()
        return await asyncio.wait_for(proc.wait(), SLOW_WAIT)


async def requests(session: aiohttp.ClientSession, url: str, count: int) -> int:
    """`count` JSON-RPC POSTs over CONCURRENCY workers; returns how many got a 200."""
    remaining = count
    ok = 0

    async def worker() -> None:
        nonlocal remaining, ok
        while remaining > 0:
            remaining -= 1
            async with session.post(url, data=b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
                                    headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                ok += resp.status == 200

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), 600)
    return ok


async def streams(session: aiohttp.ClientSession, url: str, meter: Meter) -> int:
    """Open STREAMS event streams at once, see each one's first event, then drop them all."""
    sem = asyncio.Semaphore(256)  # open them quickly but not as a SYN flood

    async def one() -> aiohttp.ClientResponse:
        async with sem:
            resp = await session.get(url, headers={"Accept": "text/event-stream"})
            assert await resp.content.readuntil(b"\n\n") == b"data: open\n\n"
            return resp

    opened = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(STREAMS))), 300)
    meter.take()  # all streams open at once: this is the fd peak
    for resp in opened:
        resp.close()
    return len(opened)


async def settle(meter: Meter, floor: int) -> Sample:
    """Wait (bounded) until the proxy's descriptors stop falling towards `floor`."""
    deadline = time.monotonic() + 60
    last = meter.take()
    while time.monotonic() < deadline and last.fds > floor:
        await asyncio.sleep(0.5)  # polling a process we do not control; bounded above
        last = meter.take()
    return last


async def test_soak_requests_and_streams_leave_rss_and_fds_flat(tmp_path: Path) -> None:
    """Under sustained load the proxy does not leak memory or file descriptors."""
    target, port = await spawn([sys.executable, "-c", TARGET], tmp_path / "target.err")
    proxy = None
    try:
        proxy, proxy_url = await spawn(
            [sys.executable, "-m", "proxy", "run", "--target-url",
             f"http://127.0.0.1:{port}/mcp", "--state-dir", str(tmp_path / "state"),
             "--health-interval", "0", "--log-level", "warning", "--log-format", "json"],
            tmp_path / "proxy.err",
        )
        base = proxy_url.rsplit("/", 1)[0]
        meter = Meter(proxy.pid)
        start = meter.take()
        stop_meter = asyncio.Event()
        sampling = asyncio.create_task(meter.run(stop_meter))
        began = time.monotonic()
        round_ends: list[Sample] = []
        ok = opened = 0
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                for _ in range(ROUNDS):
                    ok += await requests(session, proxy_url, REQUESTS // ROUNDS)
                    opened += await streams(session, base + "/sse", meter)
                    round_ends.append(await settle(meter, start.fds + CONCURRENCY + 16))
            end = await settle(meter, start.fds + 8)  # the client's keep-alives are gone too
        finally:
            stop_meter.set()
            await sampling
        took = time.monotonic() - began
        peak = meter.peak
        report = (f"\nsoak: {ok} requests, {ROUNDS} x {STREAMS} streams in {took:.1f} s "
                  f"({ok / took:.0f} req/s incl. streams)\n"
                  f"  proxy RSS KiB: start {start.rss_kib}, peak {peak.rss_kib}, "
                  f"after round 1 {round_ends[0].rss_kib}, end {end.rss_kib}\n"
                  f"  proxy fds:     start {start.fds}, peak {peak.fds}, "
                  f"after round 1 {round_ends[0].fds}, end {end.fds}\n")
        print(report)
        (tmp_path / "soak.txt").write_text(report)
        assert ok == REQUESTS
        assert opened == ROUNDS * STREAMS
        assert peak.fds >= STREAMS  # the streams really were open at once
        # Descriptors: back to the start, give or take idle upstream keep-alives.
        assert end.fds <= start.fds + CONCURRENCY + 16
        # Memory: the second identical round must not grow what the first one left.
        assert end.rss_kib <= round_ends[0].rss_kib * 1.10 + 8 * 1024
        assert await stop(proxy) == 0
    finally:
        if proxy is not None:
            await stop(proxy, signal.SIGKILL)
        await stop(target, signal.SIGKILL)
