"""pyproject.toml's dependency ranges, tested at both ends: the project installed from its
wheel into fresh venvs with the lowest and with the newest aiohttp and httptools the
ranges allow, forwarding a JSON answer and an event stream; and a version outside them
stopping the proxy at start-up with one line.

Slow (each venv installs from PyPI, through pip's cache), so marked `bounds` and run
explicitly: `.venv/bin/python -m pytest -q -m bounds tests/packaging/test_dependency_bounds.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.wire.compat import SUPPORTED, supported_range

pytestmark = [pytest.mark.bounds, pytest.mark.timeout(900)]

PROJECT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT = 600.0
WAIT = 15.0
EVENTS = 5
BOUNDS = {
    "lowest": [f"{name}=={low}" for name, (low, _) in SUPPORTED.items()],
    "newest": [f"{name}{supported_range(name)}" for name in SUPPORTED],
}


def _run(*argv: str | Path, timeout: float = INSTALL_TIMEOUT) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "--disable-pip-version-check", "-w", out, PROJECT)
    (built,) = out.glob("mcp_authproxy-*.whl")
    return built


@pytest.fixture(scope="module", params=sorted(BOUNDS))
def venv(request: pytest.FixtureRequest, wheel: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """A fresh venv with the project (non-editable) and one bound of each range."""
    bound: str = request.param
    where = tmp_path_factory.mktemp(f"venv-{bound}")
    _run(sys.executable, "-m", "venv", where)
    python = where / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel,
         *BOUNDS[bound])
    versions = {}
    for name in SUPPORTED:
        versions[name] = _run(python, "-c", f"import importlib.metadata as m; "
                                            f"print(m.version({name!r}))").strip()
    yield bound, where, versions


@pytest.fixture
async def target() -> AsyncIterator[str]:
    """A target answering POST /mcp with JSON, or with an event stream when asked."""
    async def mcp(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if request.headers.get("Accept", "").startswith("text/event-stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(EVENTS):
                await response.write(f"id: {i}\ndata: {json.dumps(body)}\n\n".encode())
                await asyncio.sleep(0.01)
            await response.write_eof()
            return response
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": {"ok": True}})

    app = web.Application()
    app.router.add_post("/mcp", mcp)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        await runner.cleanup()


async def _start(where: Path, target_url: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        str(where / "bin" / "mcp-authproxy"), "run", "--target-url", target_url,
        "--port", "0", "--health-interval", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MCP_AUTHPROXY_STATE_DIR": str(where / "state")},
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), WAIT)
    return proc, line.decode().strip()


async def test_the_bound_forwards_json_and_an_event_stream(
    venv: tuple[str, Path, dict[str, str]], target: str
) -> None:
    """With the lowest / newest allowed aiohttp and httptools the installed proxy forwards
    a JSON answer and a whole event stream."""
    bound, where, versions = venv
    print(f"{bound}: {versions}")
    if bound == "lowest":  # "3.12" is 3.12.0
        assert all(versions[name].startswith(low) for name, (low, _) in SUPPORTED.items())
    proc, url = await _start(where, target)
    try:
        assert url.startswith("http://"), url
        async with aiohttp.ClientSession() as client:
            call = {"jsonrpc": "2.0", "id": 7, "method": "ping"}
            async with client.post(url, json=call) as resp:
                assert resp.status == 200
                assert await resp.json() == {"jsonrpc": "2.0", "id": 7, "result": {"ok": True}}
            async with client.post(url, json=call,
                                   headers={"Accept": "text/event-stream"}) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "text/event-stream"
                body = await asyncio.wait_for(resp.read(), WAIT)
        events = [e for e in body.decode().split("\n\n") if e]
        assert events == [f"id: {i}\ndata: {json.dumps(call)}" for i in range(EVENTS)]
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), WAIT)


def test_a_version_below_the_range_stops_the_proxy_at_start(
    venv: tuple[str, Path, dict[str, str]]
) -> None:
    """An httptools older than the range (pip installs what it is told) stops the proxy at
    once with one line naming the installed and the supported versions."""
    bound, where, _ = venv
    if bound != "lowest":
        pytest.skip("one venv is enough to downgrade")
    python = where / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "httptools==0.6.1")
    try:
        done = subprocess.run(
            [str(where / "bin" / "mcp-authproxy"), "run", "--target-url",
             "http://127.0.0.1:9/mcp", "--port", "0"],
            capture_output=True, text=True, timeout=WAIT,
            env={**os.environ, "MCP_AUTHPROXY_STATE_DIR": str(where / "state")})
        assert done.returncode == 1
        assert done.stdout == ""
        assert done.stderr.splitlines() == [
            "mcp-authproxy: error: unsupported dependency version: httptools 0.6.1 is "
            f"installed, supported: {supported_range('httptools')}"]
    finally:
        low = SUPPORTED["httptools"][0]
        _run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "--no-deps", f"httptools=={low}")


