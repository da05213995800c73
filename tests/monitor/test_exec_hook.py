"""An `--on-unauthorized-exec` hook that is still running when the proxy stops."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
from aiohttp import web
from structlog.testing import capture_logs

from proxy import AuthProxy, ProxyConfig
from proxy.monitor.hooks import CHILD_GRACE, exec_callback

from helpers import WAIT, UpstreamFactory, eventually, write_secret


def _alive(pid: int) -> bool:
    """Running, or stopped but not yet reaped by anyone (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


async def test_a_hook_still_running_at_stop_is_stopped_with_the_proxy(
    make_upstream: UpstreamFactory, tmp_path: Path
) -> None:
    """A hook that ignores SIGTERM and would run for ten minutes: stopping the proxy
    waits drain_timeout for it, then ends it (SIGTERM, SIGKILL after CHILD_GRACE); no
    child is left behind, and the stop says so in one WARN."""

    async def deny(request: web.Request) -> web.Response:
        return web.json_response({}, status=401,
                                 headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    upstream = await make_upstream(deny)
    pid_file = tmp_path / "hook.pid"
    script = ("import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)")
    hook = exec_callback(f"{sys.executable} -c \"{script}\" {pid_file}")
    config = ProxyConfig(target_url=str(upstream.make_url("/mcp")), name="hook",
                         state_dir=tmp_path / "state", health_interval=0,
                         bearer_token_file=write_secret(tmp_path / "token", "t0k3n-hook"),
                         drain_timeout=0.5)
    proxy = AuthProxy(config, on_unauthorized=hook)
    await proxy.start()
    try:
        async with aiohttp.ClientSession() as session, session.post(proxy.url, json={}) as resp:
            assert resp.status == 503
        await eventually(lambda: pid_file.exists() and pid_file.read_text().isdigit(), WAIT,
                         what="the hook to start", every=0.05)
        child = int(pid_file.read_text())
        assert _alive(child)
    finally:
        loop = asyncio.get_running_loop()
        began = loop.time()
        with capture_logs() as logs:
            await asyncio.wait_for(proxy.stop(), WAIT)
        took = loop.time() - began
    assert not _alive(child)
    assert took < 0.5 + CHILD_GRACE + 2.0
    stopped = [e for e in logs if e["event"] == "on_unauthorized_exec_stopped"]
    assert len(stopped) == 1 and stopped[0]["log_level"] == "warning"
    assert stopped[0]["exit_code"] == -9  # it ignored SIGTERM
