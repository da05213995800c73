"""The official MCP Python SDK, client and server, talking through the proxy.

Every test runs the SDK's own server (behind a revocable bearer gate) and the SDK's own
client; the proxy sits in between with a credential source, so the client never sends
the upstream's token itself. What a user would notice is in each test's docstring.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from mcp.shared.exceptions import MCPError

from proxy import (
    AuthProxy,
    ProxyConfig,
    ReauthorizedEvent,
    UnauthorizedEvent,
    WorkloadStatus,
)

from .conftest import (
    REVOKED_DESCRIPTION,
    UpstreamFactory,
    connect,
    echoes,
    lists_echoes_and_counts,
    status_file,
    text_of,
    unwrap,
)
from helpers import LONG_WAIT, Started, write_secret

FILE_TOKEN = "file-token-4f9c2d7e1a"  # a test credential that must never leak


def _config(upstream_url: str, state_dir: Path, name: str, **kwargs: Any) -> ProxyConfig:
    return ProxyConfig(
        target_url=upstream_url,
        port=0,
        name=name,
        state_dir=state_dir,
        health_interval=0,
        drain_timeout=1.0,
        **kwargs,
    )


async def _expect_mcp_error(call: Awaitable[object]) -> MCPError:
    """Awaits `call`, expecting the SDK to raise an `MCPError` (maybe inside a group)."""
    try:
        await asyncio.wait_for(call, LONG_WAIT)
    except MCPError as exc:
        return exc
    except BaseExceptionGroup as group:
        errors = [e for e in unwrap(group) if isinstance(e, MCPError)]
        if errors:
            return errors[0]
        raise
    raise AssertionError("the call succeeded; expected the SDK to report an error")


# --- 1. Streamable HTTP ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_streamable_http_session_works_through_the_proxy(
    mcp_upstream: UpstreamFactory, tmp_path: Path, mode: str
) -> None:
    """An SDK client pointed at the proxy initializes, lists and calls tools, and sees
    every progress notification of a long tool call in order, each as it is sent."""
    upstream = await mcp_upstream("streamable", FILE_TOKEN)
    token_file = write_secret(tmp_path / "token", FILE_TOKEN)
    config = _config(upstream.url, tmp_path, "stream", bearer_token_file=token_file)
    async with AuthProxy(config) as running, connect(running.url, mode=mode) as client:
        seen_progress = await lists_echoes_and_counts(client, upstream, 5)
        assert running.status.status == WorkloadStatus.RUNNING

    assert seen_progress == [(step, 5, f"step {step}") for step in range(1, 6)]
    assert upstream.gate.seen, "the upstream saw no request"
    assert not upstream.gate.rejected
    assert all(r.authorization == f"Bearer {FILE_TOKEN}" for r in upstream.gate.seen)
    assert all("x-forwarded-for" in r.headers for r in upstream.gate.seen)
    if mode == "legacy":
        # The session the upstream handed out came back on every later request.
        posts = [r for r in upstream.gate.seen if r.method == "POST"]
        assert "mcp-session-id" not in posts[0].headers
        session_ids = {r.headers.get("mcp-session-id") for r in posts[1:]}
        assert len(session_ids) == 1 and None not in session_ids
        assert all("mcp-protocol-version" in r.headers for r in posts[1:])


async def test_clients_own_token_is_not_passed_to_the_upstream(
    mcp_upstream: UpstreamFactory, tmp_path: Path
) -> None:
    """A client that sends its own bearer token still works, and the upstream only ever
    sees the proxy's credential (no token passthrough)."""
    upstream = await mcp_upstream("streamable", FILE_TOKEN)
    token_file = write_secret(tmp_path / "token", FILE_TOKEN)
    config = _config(upstream.url, tmp_path, "passthrough", bearer_token_file=token_file)
    async with (
        AuthProxy(config) as running,
        connect(running.url, token="clients-own-token") as client,
    ):
        await echoes(client, "x")
    assert all(r.authorization == f"Bearer {FILE_TOKEN}" for r in upstream.gate.seen)
    assert not any("clients-own-token" in json.dumps(r.headers) for r in upstream.gate.seen)


# --- 2. Legacy HTTP+SSE ---------------------------------------------------------------


@pytest.mark.parametrize("absolute", [False, True], ids=["relative-endpoint", "absolute-endpoint"])
async def test_legacy_sse_transport_works_through_the_proxy(
    mcp_upstream: UpstreamFactory, tmp_path: Path, absolute: bool
) -> None:
    """An SDK client on the legacy HTTP+SSE transport connects to the proxy, is told to
    post its messages back through the proxy, and initializes and calls a tool."""
    upstream = await mcp_upstream("sse", FILE_TOKEN)
    if absolute:
        # Many servers announce the full URL on their own origin; the SDK client refuses
        # an endpoint on another origin than it connected to, so the proxy must rewrite.
        upstream.gate.absolute_endpoint_origin = upstream.origin
    token_file = write_secret(tmp_path / "token", FILE_TOKEN)
    config = _config(upstream.url, tmp_path, "legacy-sse", bearer_token_file=token_file)

    async with (
        AuthProxy(config) as running,
        connect(running.url, transport="sse") as client,
    ):
        assert running.url.endswith("/sse")
        tools = await asyncio.wait_for(client.list_tools(), LONG_WAIT)
        assert "echo" in {tool.name for tool in tools.tools}
        await echoes(client, "legacy")

    gets = [r for r in upstream.gate.seen if r.method == "GET" and r.path == "/sse"]
    posts = [r for r in upstream.gate.seen if r.method == "POST"]
    assert gets, "the SSE stream did not reach the upstream through the proxy"
    # initialize, notifications/initialized, tools/list, tools/call at least.
    assert len(posts) >= 4
    for post in posts:
        assert post.path.startswith("/messages/")
        assert "session_id=" in post.query
        # Only the proxy adds these: the POSTs came through it, not around it.
        assert post.authorization == f"Bearer {FILE_TOKEN}"
        assert "x-forwarded-for" in post.headers


# --- 3. Token revoked mid-session -----------------------------------------------------


async def test_revoked_token_mid_session_marks_the_workload_unauthenticated(
    mcp_upstream: UpstreamFactory, tmp_path: Path
) -> None:
    """When the upstream revokes the token mid-session, the SDK client gets an error, the
    status file says `unauthenticated` with the upstream's reason, the callback fires once,
    and the token appears in neither the status file nor the logs."""
    upstream = await mcp_upstream("streamable", FILE_TOKEN)
    token_file = write_secret(tmp_path / "token", FILE_TOKEN)
    config = _config(upstream.url, tmp_path, "revoked", bearer_token_file=token_file)
    events: list[UnauthorizedEvent] = []
    called = asyncio.Event()

    status_at_callback: list[str] = []

    async def on_unauthorized(event: UnauthorizedEvent) -> None:
        # The contract: the callback runs only once the status file already says so.
        status_at_callback.append(status_file(tmp_path, "revoked")["status"])
        events.append(event)
        called.set()

    with structlog.testing.capture_logs() as logs:
        async with (
            AuthProxy(config, on_unauthorized=on_unauthorized) as running,
            connect(running.url) as client,
        ):
            await echoes(client, "ok")

            upstream.gate.accept_only("some-other-token")
            await _expect_mcp_error(client.call_tool("echo", {"text": "revoked"}))
            # More failing calls, two of them concurrent, are the same episode.
            await _expect_mcp_error(client.call_tool("echo", {"text": "again"}))
            await asyncio.gather(
                _expect_mcp_error(client.call_tool("echo", {"text": "a"})),
                _expect_mcp_error(client.call_tool("echo", {"text": "b"})),
            )
            await asyncio.wait_for(called.wait(), LONG_WAIT)
            await asyncio.wait_for(running.monitor.flush(), LONG_WAIT)

            record = running.status
            assert record.status == WorkloadStatus.UNAUTHENTICATED
            on_disk = status_file(tmp_path, "revoked")
            assert on_disk["status"] == "unauthenticated"
            assert "invalid_token" in on_disk["message"]
            assert REVOKED_DESCRIPTION in on_disk["message"]
            status_text = (tmp_path / "workloads" / "revoked.json").read_text()
            assert FILE_TOKEN not in status_text

    assert len(events) == 1, events
    assert status_at_callback == ["unauthenticated"]
    rejected_posts = [r for r in upstream.gate.rejected if r.method == "POST"]
    assert len(rejected_posts) >= 4
    assert all(r.authorization == f"Bearer {FILE_TOKEN}" for r in rejected_posts)
    event = events[0]
    assert event.status_code == 401
    assert event.error == "invalid_token"
    assert event.error_description == REVOKED_DESCRIPTION
    assert event.workload == "revoked"
    assert FILE_TOKEN not in repr(event)

    warnings = [e for e in logs if e.get("event") == "unauthorized"]
    assert len(warnings) == 1, warnings
    assert warnings[0]["log_level"] == "warning"
    assert FILE_TOKEN not in repr(logs)
    assert FILE_TOKEN not in (tmp_path / "workloads" / "revoked.json").read_text()


async def test_restored_token_file_ends_the_episode(
    mcp_upstream: UpstreamFactory, tmp_path: Path
) -> None:
    """After a revocation, writing a new token to the token file lets the same SDK session
    carry on, the workload returns to `running` and the reauthorized callback fires once."""
    upstream = await mcp_upstream("streamable", FILE_TOKEN)
    token_file = write_secret(tmp_path / "token", FILE_TOKEN)
    config = _config(upstream.url, tmp_path, "restored", bearer_token_file=token_file)
    unauthorized: list[UnauthorizedEvent] = []
    reauthorized: list[ReauthorizedEvent] = []
    opened, closed = asyncio.Event(), asyncio.Event()

    def on_unauthorized(event: UnauthorizedEvent) -> None:
        unauthorized.append(event)
        opened.set()

    def on_reauthorized(event: ReauthorizedEvent) -> None:
        reauthorized.append(event)
        closed.set()

    new_token = "the-rotated-token-with-another-length"
    async with (
        AuthProxy(
            config, on_unauthorized=on_unauthorized, on_reauthorized=on_reauthorized
        ) as running,
        connect(running.url) as client,
    ):
        await asyncio.wait_for(client.call_tool("echo", {"text": "before"}), LONG_WAIT)
        upstream.gate.accept_only(new_token)
        await _expect_mcp_error(client.call_tool("echo", {"text": "revoked"}))
        await asyncio.wait_for(opened.wait(), LONG_WAIT)
        await asyncio.wait_for(running.monitor.flush(), LONG_WAIT)
        assert running.status.status == WorkloadStatus.UNAUTHENTICATED
        # A runner saying "running" changes nothing while the episode is open.
        assert (await running.set_running()).status == WorkloadStatus.UNAUTHENTICATED

        write_secret(token_file, new_token)
        # The file is re-read within a second or on the next 401 (the contract), and a
        # bearer file cannot be replayed: so the first call may still fail, the second not.
        result = None
        for _attempt in range(2):
            try:
                result = await asyncio.wait_for(
                    client.call_tool("echo", {"text": "after"}), LONG_WAIT
                )
                break
            except MCPError:
                continue
        assert result is not None and text_of(result) == "echo: after"
        await asyncio.wait_for(closed.wait(), LONG_WAIT)
        await asyncio.wait_for(running.monitor.flush(), LONG_WAIT)
        after = running.status
        assert after.status == WorkloadStatus.RUNNING
        assert status_file(tmp_path, "restored")["status"] == "running"

    assert len(unauthorized) == 1
    assert len(reauthorized) == 1
    assert reauthorized[0].unauthorized_since == unauthorized[0].at
    assert status_file(tmp_path, "restored")["status"] == "stopped"


# --- 4. OAuth refresh and replay ------------------------------------------------------


class TokenEndpoint:
    """A small OAuth token endpoint on loopback issuing tok-1, tok-2, ... in turn."""

    def __init__(self) -> None:
        self.issued: list[str] = []
        self.requests: list[dict[str, str]] = []
        self.authorizations: list[str | None] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/token"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.requests.append({k: str(v) for k, v in form.items()})
        self.authorizations.append(request.headers.get("Authorization"))
        token = f"tok-{len(self.issued) + 1}"
        self.issued.append(token)
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": 3600}
        )


@pytest.fixture
async def token_endpoint() -> AsyncIterator[TokenEndpoint]:
    async with Started() as started:
        yield await started.start(TokenEndpoint())


async def test_oauth_refresh_and_replay_is_invisible_to_the_sdk_client(
    mcp_upstream: UpstreamFactory, tmp_path: Path, token_endpoint: TokenEndpoint
) -> None:
    """When the upstream stops accepting the OAuth access token mid-session, the proxy
    fetches a new one and replays the call: the SDK client sees no error, and no
    unauthenticated episode opens."""
    upstream = await mcp_upstream("streamable", "tok-1")
    secret_file = write_secret(tmp_path / "client-secret", "client-s3cret-value")
    config = _config(
        upstream.url,
        tmp_path,
        "oauth",
        oauth_token_url=token_endpoint.url,
        oauth_client_id="interop-client",
        oauth_client_secret_file=secret_file,
    )
    events: list[UnauthorizedEvent] = []
    seen_progress: list[float] = []

    def on_unauthorized(event: UnauthorizedEvent) -> None:
        events.append(event)

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen_progress.append(progress)
        upstream.progress.client_saw_first.set()

    with structlog.testing.capture_logs() as logs:
        async with (
            AuthProxy(config, on_unauthorized=on_unauthorized) as running,
            connect(running.url) as client,
        ):
            await echoes(client, "one")
            assert token_endpoint.issued == ["tok-1"]

            upstream.gate.accept_only("tok-2")
            await echoes(client, "two")
            # A streamed answer after the refresh still streams.
            counted = await asyncio.wait_for(
                client.call_tool("count", {"steps": 3}, progress_callback=on_progress), LONG_WAIT
            )
            assert text_of(counted) == "counted to 3"

            await asyncio.wait_for(running.monitor.flush(), LONG_WAIT)
            assert running.status.status == WorkloadStatus.RUNNING
            on_disk = status_file(tmp_path, "oauth")
            assert on_disk["status"] == "running"

    assert events == []
    assert seen_progress == [1, 2, 3]
    assert token_endpoint.issued == ["tok-1", "tok-2"]
    assert all(r["grant_type"] == "client_credentials" for r in token_endpoint.requests)
    assert all(r["resource"] == upstream.url for r in token_endpoint.requests)
    assert all((a or "").startswith("Basic ") for a in token_endpoint.authorizations)
    # Exactly one rejected request: the one the proxy replayed with tok-2.
    assert len(upstream.gate.rejected) == 1
    assert upstream.gate.rejected[0].authorization == "Bearer tok-1"
    assert not [e for e in logs if e.get("event") == "unauthorized"]
    leaked = repr(logs) + (tmp_path / "workloads" / "oauth.json").read_text()
    for secret in ("client-s3cret-value", "tok-1", "tok-2"):
        assert secret not in leaked
