"""The interop matrix: the MCP clients people run, through the proxy's CLI, against the
TypeScript and Python SDK servers, over Streamable HTTP and the legacy HTTP+SSE.

Every cell is one test here; the README's matrix names them. The proxy runs as a user
runs it (`python -m proxy run`, a token file), each Node process is started and stopped
by pid, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from .conftest import Transport, UpstreamFactory, connect, text_of
from .processes import (
    INITIALIZE,
    TOKEN,
    WAIT,
    Processes,
    client_outcome,
    inspector_cli,
    mcp_remote,
    proxy_for,
    start_ts_server,
    stdio_request,
    ts_client,
)

TS_TOOLS = ["count", "echo", "large", "notify", "release"]
LARGE_BYTES = 2 * 1024 * 1024


def only_the_proxys_credential(seen: list[dict[str, Any]]) -> None:
    """The target saw requests, every MCP one carried the proxy's token, none was refused."""
    mcp = [r for r in seen if r["path"] in ("/mcp", "/sse", "/messages")]
    assert mcp, "the target saw no MCP request"
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in mcp)
    assert not [r for r in mcp if r["status"] == 401]


# --- TypeScript SDK client ---------------------------------------------------------------


async def test_ts_client_ts_server_streamable_http(processes: Processes) -> None:
    """The TS SDK client, through the proxy, initializes, lists tools, sees each progress
    notification while the tool runs, gets a 2 MiB result whole, hears a server
    notification on its GET stream, and ends its session with a DELETE."""
    server = await start_ts_server(processes, TOKEN)
    proxy = await proxy_for(processes, server.url("streamable"), "ts-ts-http")
    client = await ts_client(processes, proxy.url, transport="streamable",
                             steps="tools,echo,count,large,notify,terminate")
    steps = await client_outcome(client)

    assert steps["connect"]["server"]["name"] == "interop-ts-upstream"
    assert steps["tools"]["tools"] == TS_TOOLS
    assert steps["echo"]["text"] == "echo: héllo"
    # `count` waits after step 1 until the client, having seen it, calls `release`.
    assert steps["count"]["text"] == "counted to 4"
    assert steps["count"]["progress"] == [[n, 4, f"step {n}"] for n in range(1, 5)]
    assert steps["large"] == {"step": "large", "length": LARGE_BYTES, "intact": True}
    assert steps["notify"]["text"] == "notifying" and steps["notify"]["list_changed"] is True
    session = steps["terminate"]["session"]
    seen = await server.seen()
    only_the_proxys_credential(seen)
    gets = [r for r in seen if r["method"] == "GET" and r["path"] == "/mcp"]
    assert gets and gets[0]["headers"]["mcp-session-id"] == session
    deletes = [r for r in seen if r["method"] == "DELETE"]
    assert [(r["headers"]["mcp-session-id"], r["status"]) for r in deletes] == [(session, 200)]
    assert proxy.status()["status"] == "running"


async def test_ts_client_ts_server_legacy_sse(processes: Processes) -> None:
    """The TS SDK client on the legacy HTTP+SSE transport posts back through the proxy
    (the `endpoint` event rewritten), calls tools and gets the large result whole."""
    server = await start_ts_server(processes, TOKEN)
    proxy = await proxy_for(processes, server.url("sse"), "ts-ts-sse")
    client = await ts_client(processes, proxy.url, transport="sse",
                             steps="tools,echo,count,large,notify")
    steps = await client_outcome(client)

    assert steps["tools"]["tools"] == TS_TOOLS
    assert steps["echo"]["text"] == "echo: héllo"
    # The TS SDK's SSE server sends a tool's later progress after its result (the SDK
    # does so without the proxy too), so only the first, which `release` needs, counts.
    assert steps["count"]["text"] == "counted to 4"
    assert steps["count"]["progress"][0] == [1, 4, "step 1"]
    assert steps["large"]["length"] == LARGE_BYTES and steps["large"]["intact"]
    assert steps["notify"]["list_changed"] is True
    seen = await server.seen()
    only_the_proxys_credential(seen)
    posts = [r for r in seen if r["method"] == "POST"]
    assert posts and all(r["path"] == "/messages" for r in posts)


@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_ts_client_python_server(
    processes: Processes, mcp_upstream: UpstreamFactory, transport: str
) -> None:
    """The TS SDK client, through the proxy, works with the Python SDK's server: tools
    listed, a call answered, progress seen while the tool runs."""
    upstream = await mcp_upstream(transport, TOKEN)
    proxy = await proxy_for(processes, upstream.url, f"ts-py-{transport}")
    client = await ts_client(processes, proxy.url, transport=transport, steps="tools,echo,count")
    steps = await client_outcome(client)

    assert {"echo", "count", "release"} <= set(steps["tools"]["tools"])
    assert steps["echo"]["text"] == "echo: héllo"
    assert steps["count"]["text"] == "counted to 4"
    assert steps["count"]["progress"][0] == [1, 4, "step 1"]
    assert upstream.gate.seen and not upstream.gate.rejected
    assert all(r.authorization == f"Bearer {TOKEN}" for r in upstream.gate.seen)


# --- Python SDK client against the TypeScript SDK server ----------------------------------


@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_python_client_ts_server(processes: Processes, transport: Transport) -> None:
    """The Python SDK client, through the proxy, works with the TS SDK's server: tools
    listed, progress seen while the tool runs, a large result whole."""
    server = await start_ts_server(processes, TOKEN)
    proxy = await proxy_for(processes, server.url(transport), f"py-ts-{transport}")
    updates: list[tuple[float, float | None, str | None]] = []
    releases: set[asyncio.Task[Any]] = set()

    async with connect(proxy.url, transport=transport) as client:

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            updates.append((progress, total, message))
            if len(updates) == 1:
                task = asyncio.create_task(client.call_tool("release", {}))
                releases.add(task)

        tools = await asyncio.wait_for(client.list_tools(), WAIT)
        assert sorted(t.name for t in tools.tools) == TS_TOOLS
        counted = await asyncio.wait_for(
            client.call_tool("count", {"steps": 3}, progress_callback=on_progress), WAIT
        )
        assert text_of(counted) == "counted to 3"
        # The Python SDK client refuses an SSE event above 1 MiB: ask for 960 KiB.
        large = await asyncio.wait_for(client.call_tool("large", {"bytes": 960 * 1024}), WAIT)
        assert text_of(large) == "0123456789abcdef" * (960 * 1024 // 16)
        await asyncio.wait_for(asyncio.gather(*releases), WAIT)
    assert updates[0] == (1, 3, "step 1")
    only_the_proxys_credential(await server.seen())


# --- mcp-remote (what Claude Desktop and many IDEs run) ------------------------------------


@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_mcp_remote_ts_server(processes: Processes, transport: str) -> None:
    """mcp-remote pointed at the proxy answers initialize and tools/list over stdio with
    the TS server's tools, as Claude Desktop would see them."""
    server = await start_ts_server(processes, TOKEN)
    proxy = await proxy_for(processes, server.url(transport), f"remote-{transport}")
    bridge = await mcp_remote(processes, proxy.url, transport)

    init = await stdio_request(bridge, 1, "initialize", INITIALIZE)
    assert init["result"]["serverInfo"]["name"] == "interop-ts-upstream"
    await bridge.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
    listed = await stdio_request(bridge, 2, "tools/list", {})
    assert sorted(t["name"] for t in listed["result"]["tools"]) == TS_TOOLS
    echo = {"name": "echo", "arguments": {"text": "x"}}
    called = await stdio_request(bridge, 3, "tools/call", echo)
    assert called["result"]["content"][0]["text"] == "echo: x"
    only_the_proxys_credential(await server.seen())
    assert not (processes.tmp_path / "opened").exists()


# --- MCP Inspector's CLI -----------------------------------------------------------------


@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_inspector_cli_ts_server(processes: Processes, transport: str) -> None:
    """MCP Inspector's CLI lists the TS server's tools through the proxy and exits 0."""
    server = await start_ts_server(processes, TOKEN)
    proxy = await proxy_for(processes, server.url(transport), f"inspector-{transport}")
    inspector = await inspector_cli(processes, proxy.url, transport, "--method", "tools/list")
    code = await inspector.wait(WAIT * 2)
    assert code == 0, inspector.stderr()[-2000:]
    assert inspector.proc.stdout is not None
    listed = json.loads(await inspector.proc.stdout.read())
    assert sorted(t["name"] for t in listed["tools"]) == TS_TOOLS
    only_the_proxys_credential(await server.seen())


