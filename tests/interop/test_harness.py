"""The interop harness itself, without the proxy: the SDK client against the SDK server.

If these fail, the proxy tests beside them prove nothing; if these pass and a proxy test
fails, the proxy is at fault.
"""

from __future__ import annotations

import asyncio

import pytest
from mcp.shared.exceptions import MCPError

from .conftest import UpstreamFactory, connect, echoes, lists_echoes_and_counts, unwrap
from helpers import LONG_WAIT


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_sdk_client_talks_to_gated_sdk_server_directly(
    mcp_upstream: UpstreamFactory, mode: str
) -> None:
    """With the right token, the SDK client lists and calls tools and sees streamed progress."""
    upstream = await mcp_upstream("streamable", "direct-token")
    async with connect(upstream.url, token="direct-token", mode=mode) as client:
        seen = await lists_echoes_and_counts(client, upstream, 3)
    assert seen == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]


async def test_gate_rejects_a_revoked_token_with_a_challenge(
    mcp_upstream: UpstreamFactory,
) -> None:
    """Once the token is revoked the SDK client's next call fails, and the upstream said 401."""
    upstream = await mcp_upstream("streamable", "direct-token")
    async with connect(upstream.url, token="direct-token") as client:
        await asyncio.wait_for(client.call_tool("echo", {"text": "ok"}), LONG_WAIT)
        upstream.gate.accept_only("another-token")
        with pytest.raises(MCPError):
            try:
                await asyncio.wait_for(client.call_tool("echo", {"text": "no"}), LONG_WAIT)
            except BaseExceptionGroup as group:
                raise unwrap(group)[0] from None
    assert any(r.method == "POST" for r in upstream.gate.rejected)


@pytest.mark.parametrize("absolute", [False, True])
async def test_sdk_sse_client_talks_to_gated_sdk_sse_server_directly(
    mcp_upstream: UpstreamFactory, absolute: bool
) -> None:
    """The legacy HTTP+SSE transport works end to end without a proxy, either endpoint form."""
    upstream = await mcp_upstream("sse", "direct-token")
    if absolute:
        upstream.gate.absolute_endpoint_origin = upstream.origin
    async with connect(upstream.url, transport="sse", token="direct-token") as client:
        await echoes(client, "sse")
    posts = [r for r in upstream.gate.seen if r.method == "POST"]
    assert posts and all(r.path.startswith("/messages/") for r in posts)
