"""Process-level faults: kill -9 during status writes, idle keep-alive, SIGTERM under load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.status.store import decode

from helpers import WAIT, ProxyFactory, UpstreamFactory, answering

WRITER = textwrap.dedent("""
    import sys
    from proxy.status import model as st
    from proxy.status.store import FileStore

    store = FileStore(sys.argv[1], "victim")
    store.update_sync(st.Started(pid=1, target_url="http://127.0.0.1:1/mcp"))
    flag = False
    n = 0
    while True:
        flag = not flag
        message = ("x" * 2000 if flag else "y" * 50) + f" {n}"
        store.update_sync(st.SetCondition(st.ConditionType.AUTHENTICATED, flag, "Flip", message))
        n += 1
        print(n, flush=True)
""")

DRAINER = textwrap.dedent("""
    import asyncio, signal, sys
    from proxy import log
    from proxy.app import AuthProxy
    from proxy.config import ProxyConfig

    async def main() -> None:
        log.configure("info", "json")  # to stderr: stdout carries only the URL
        config = ProxyConfig(target_url=sys.argv[1], state_dir=sys.argv[2], name="drain",
                             health_interval=0, drain_timeout=float(sys.argv[3]))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with AuthProxy(config) as proxy:
            print(proxy.url, flush=True)
            await stop.wait()

    if sys.argv[4] == "uvloop":
        import uvloop  # what the CLI runs on when the extra is installed
        uvloop.run(main())
    else:
        asyncio.run(main())
""")


async def spawn(script: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await asyncio.wait_for(proc.wait(), WAIT)


@pytest.mark.parametrize("writes", [1, 7, 40, 150])
async def test_kill_9_during_status_writes_leaves_a_parseable_file(
    tmp_path: Path, writes: int
) -> None:
    """A proxy killed at any moment leaves its status file old or new, never half-written."""
    proc = await spawn(WRITER, str(tmp_path))
    try:
        assert proc.stdout is not None
        for _ in range(writes):
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line, (await proc.stderr.read()).decode() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), WAIT)
    finally:
        await reap(proc)
    data = (tmp_path / "workloads" / "victim.json").read_bytes()
    record = decode(data, "victim")
    assert record.name == "victim"
    assert record.to_dict()["message"] or record.conditions


async def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout(
    make_upstream: UpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """A client that keeps a connection open and says nothing is let go after keepalive_timeout."""
    upstream = await make_upstream(answering("hi"))
    proxy = await make_proxy(str(upstream.make_url("/mcp")), header_timeout=60,
                             keepalive_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\nhi"), WAIT)
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
    finally:
        writer.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_sigterm_with_200_open_streams_drains_in_time_and_says_stopped(
    make_upstream: UpstreamFactory, tmp_path: Path, loop: str
) -> None:
    """Stopping a busy proxy ends every stream within drain_timeout, exits 0 and says stopped."""
    streams = 200
    drain = 1.0
    opened = 0
    all_open = asyncio.Event()
    release = asyncio.Event()

    async def sse(request: web.Request) -> web.StreamResponse:
        nonlocal opened
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: open\n\n")
        opened += 1
        if opened == streams:
            all_open.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 60)
        return resp

    if loop == "uvloop":
        pytest.importorskip("uvloop")
    upstream = await make_upstream(sse)
    state = tmp_path / "state"
    proc = await spawn(DRAINER, str(upstream.make_url("/mcp")), str(state), str(drain), loop)
    connector = aiohttp.TCPConnector(limit=0)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            assert proc.stdout is not None and proc.stderr is not None
            url = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
            assert url, (await proc.stderr.read()).decode()
            responses = await asyncio.wait_for(
                asyncio.gather(*(session.get(url) for _ in range(streams))), 30)
            await asyncio.wait_for(all_open.wait(), 30)
            for resp in responses:
                assert resp.status == 200
            clock = asyncio.get_running_loop()
            began = clock.time()
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), drain + 10)
            took = clock.time() - began
            assert code == 0, (await proc.stderr.read()).decode()[-2000:]

            async def ended(resp: aiohttp.ClientResponse) -> None:
                with contextlib.suppress(aiohttp.ClientError):
                    await resp.read()
                resp.close()

            await asyncio.wait_for(asyncio.gather(*(ended(r) for r in responses)), WAIT)
    finally:
        release.set()
        await reap(proc)
    # Bounded by the drain plus a margin for start-up of the interpreter's shutdown.
    assert took < drain + 5
    record = json.loads((state / "workloads" / "drain.json").read_text())
    assert record["status"] == "stopped"
