"""Health probes alone end an auth episode in front of the Python SDK's stateful server.

The SDK's default Streamable HTTP server answers a session-less `ping` with 400, so a
probe that only pings can never prove a healed credential: a runner waiting for
`running` before it sends traffic would wait forever. No MCP client runs in these
tests; only the proxy's probes reach the target.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from proxy import AuthProxy, ProxyConfig, WorkloadStatus

from .conftest import McpUpstream, UpstreamFactory, status_file
from helpers import LONG_WAIT as WAIT
from helpers import Episodes, eventually, status_now, write_secret

TOKEN = "probe-token-5e1d9a7c3b"


def _config(upstream: McpUpstream, tmp_path: Path, token_file: Path, **kw: Any) -> ProxyConfig:
    return ProxyConfig(target_url=upstream.url, name="probes", state_dir=tmp_path / "state",
                       bearer_token_file=token_file, health_timeout=2.0, drain_timeout=1.0,
                       **kw)


async def assert_no_session_left(upstream: McpUpstream) -> None:
    """Every session the probes opened was deleted: the SDK server no longer knows it."""
    gate = upstream.gate

    def deleted() -> list[str]:
        return [s.headers.get("mcp-session-id", "") for s in gate.seen if s.method == "DELETE"]

    assert gate.issued_sessions, "no probe initialized a session"
    await eventually(lambda: set(deleted()) >= set(gate.issued_sessions), WAIT,
                     what="a DELETE for every session a probe opened")
    async with aiohttp.ClientSession() as session:
        for session_id in gate.issued_sessions:
            async with session.post(
                upstream.url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                headers={"Authorization": f"Bearer {TOKEN}", "Mcp-Session-Id": session_id,
                         "Accept": "application/json, text/event-stream"},
            ) as resp:
                assert resp.status == 404, f"session {session_id} is still open"


async def test_probes_alone_end_the_episode_once_the_target_accepts_the_token_again(
    mcp_upstream: UpstreamFactory, tmp_path: Path
) -> None:
    """With `--health-interval 0.5` and no client at all, a token the target rejected and
    then accepts again takes the workload from `unauthenticated` back to `running`, and
    the probes leave no session open on the target."""
    upstream = await mcp_upstream("streamable", TOKEN)
    token_file = write_secret(tmp_path / "token", TOKEN)
    episodes = Episodes()
    config = _config(upstream, tmp_path, token_file, health_interval=0.5)
    async with AuthProxy(config, on_unauthorized=episodes.on_unauthorized,
                         on_reauthorized=episodes.on_reauthorized) as running:
        upstream.gate.accept_only("someone-else")  # revoked at the target
        await asyncio.wait_for(episodes.opened.wait(), WAIT)
        await asyncio.wait_for(running.monitor.flush(), WAIT)
        assert running.status.status == WorkloadStatus.UNAUTHENTICATED

        upstream.gate.accept_only(TOKEN)  # and accepted again
        await asyncio.wait_for(episodes.closed.wait(), WAIT)
        await asyncio.wait_for(running.monitor.flush(), WAIT)
        assert status_now(running) == WorkloadStatus.RUNNING
        assert status_file(tmp_path / "state", "probes")["status"] == "running"
        await assert_no_session_left(upstream)
    assert len(episodes.unauthorized) == 1 and len(episodes.reauthorized) == 1


async def test_a_changed_credential_is_probed_at_once(
    mcp_upstream: UpstreamFactory, tmp_path: Path
) -> None:
    """With probes only every 60 s, a token file fixed while the workload is
    `unauthenticated` is probed at once: `running` again within seconds, not a minute."""
    upstream = await mcp_upstream("streamable", TOKEN)
    token_file = write_secret(tmp_path / "token", "a-stale-token")
    episodes = Episodes()
    config = _config(upstream, tmp_path, token_file, health_interval=60)
    async with AuthProxy(config, on_unauthorized=episodes.on_unauthorized,
                         on_reauthorized=episodes.on_reauthorized) as running:
        await asyncio.wait_for(episodes.opened.wait(), WAIT)  # the first probe's 401
        write_secret(token_file, TOKEN)
        # The file is checked every second; the probe follows the change at once.
        await asyncio.wait_for(episodes.closed.wait(), 5.0)
        await asyncio.wait_for(running.monitor.flush(), WAIT)
        assert running.status.status == WorkloadStatus.RUNNING
        await assert_no_session_left(upstream)
    assert all(s.method != "GET" for s in upstream.gate.seen)  # probes only
