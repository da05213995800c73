"""Harness for the interop tests: a real MCP SDK server behind a bearer-token gate.

The upstream is the official SDK's `MCPServer` (Streamable HTTP or the legacy HTTP+SSE
app), served by uvicorn in this test's event loop on a loopback port, wrapped in a small
ASGI middleware that checks `Authorization: Bearer <token>` against a token the test can
change (to "revoke" it) and records every request it sees. The SDK's own client talks to
it, directly or through the proxy. Nothing here may reach beyond 127.0.0.1, and every
server started here is stopped by its fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx2
import pytest
from mcp.client import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult, TextContent
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .processes import Processes
from helpers import LONG_WAIT, Started, UvicornServer

Transport = Literal["streamable", "sse"]
# The token the SDK client's own `Authorization` header would carry, were it to send one.
REVOKED_DESCRIPTION = "The access token was revoked"


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One HTTP request as the upstream received it (header names lower-cased)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass(slots=True)
class GateState:
    """What the bearer gate accepts and what it has seen; the test changes it freely."""

    accepted: set[str] = field(default_factory=set)
    error_description: str = REVOKED_DESCRIPTION
    seen: list[SeenRequest] = field(default_factory=list)
    rejected: list[SeenRequest] = field(default_factory=list)
    # When set, the legacy SSE `endpoint` event carries this origin before the path, as
    # many non-SDK servers send it; the proxy has to rewrite it to its own origin.
    absolute_endpoint_origin: str | None = None
    # Every `Mcp-Session-Id` the upstream issued, in order (Streamable HTTP only).
    issued_sessions: list[str] = field(default_factory=list)

    def accept_only(self, *tokens: str) -> None:
        self.accepted = set(tokens)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


class BearerGate:
    """ASGI middleware: 401 with an RFC 6750 challenge unless the bearer token is accepted."""

    def __init__(self, app: ASGIApp, state: GateState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = SeenRequest(
            method=scope["method"],
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=_headers(scope),
        )
        self.state.seen.append(seen)
        token = _bearer(seen.authorization)
        if token is None or token not in self.state.accepted:
            self.state.rejected.append(seen)
            await _send_401(send, self.state.error_description)
            return
        origin = self.state.absolute_endpoint_origin
        if origin is not None and seen.method == "GET":
            send = _absolute_endpoint_sender(send, origin)
        await self.app(scope, receive, _session_recorder(send, self.state))


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def _send_401(send: Send, description: str) -> None:
    challenge = f'Bearer error="invalid_token", error_description="{description}"'
    body = json.dumps({"error": "invalid_token", "error_description": description}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", challenge.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _session_recorder(send: Send, state: GateState) -> Send:
    """Wraps `send` so every session id the upstream issues is recorded."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            for name, value in message.get("headers", []):
                session = value.decode("latin-1")
                if name.lower() == b"mcp-session-id" and session not in state.issued_sessions:
                    state.issued_sessions.append(session)
        await send(message)

    return wrapped


def _absolute_endpoint_sender(send: Send, origin: str) -> Send:
    """Wraps `send` so the SSE `endpoint` event's relative URL becomes absolute."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.body":
            body: bytes = message.get("body", b"")
            if b"event: endpoint" in body:
                message = {**message, "body": body.replace(b"data: /", f"data: {origin}/".encode())}
        await send(message)

    return wrapped


@dataclass(slots=True)
class ProgressGate:
    """Lets the progress tool wait until the client has *seen* its first notification.

    If anything between server and client buffered the response, the client would never
    see the first notification before the tool finished, and the tool reports that.
    """

    client_saw_first: asyncio.Event = field(default_factory=asyncio.Event)
    timeout: float = 5.0


def build_mcp_server(progress_gate: ProgressGate) -> MCPServer:
    """The SDK server the tests talk to: `echo`, a progress-reporting `count`, `release`."""
    server = MCPServer("interop-upstream", log_level="WARNING")

    @server.tool()
    def echo(text: str) -> str:
        """Echoes its text back."""
        return f"echo: {text}"

    @server.tool()
    def release() -> str:
        """Lets a running `count` go on (what a client in another process calls once it
        has seen the first progress notification)."""
        progress_gate.client_saw_first.set()
        return "released"

    @server.tool()
    async def count(steps: int, ctx: Context) -> str:
        """Counts to `steps`, reporting progress after each step."""
        buffered = False
        for step in range(1, steps + 1):
            await ctx.report_progress(step, steps, f"step {step}")
            if step == 1:
                try:
                    await asyncio.wait_for(
                        progress_gate.client_saw_first.wait(), progress_gate.timeout
                    )
                except TimeoutError:
                    buffered = True
        return "progress was buffered" if buffered else f"counted to {steps}"

    return server


class McpUpstream:
    """An SDK MCP server run by uvicorn on 127.0.0.1 behind a `BearerGate`."""

    def __init__(self, transport: Transport, token: str) -> None:
        self.transport = transport
        self.gate = GateState(accepted={token})
        self.progress = ProgressGate()
        self.mcp = build_mcp_server(self.progress)
        if transport == "streamable":
            inner: ASGIApp = self.mcp.streamable_http_app(host="127.0.0.1")
            self.path = "/mcp"
        else:
            inner = self.mcp.sse_app(host="127.0.0.1")
            self.path = "/sse"
        self._app = BearerGate(inner, self.gate)
        self._server = UvicornServer()
        self.port = self._server.port
        self.origin = self._server.origin

    @property
    def url(self) -> str:
        return self.origin + self.path

    async def start(self) -> None:
        await self._server.start(self._app)

    async def stop(self) -> None:
        await self._server.stop()


UpstreamFactory = Callable[..., Awaitable[McpUpstream]]


@pytest.fixture
async def mcp_upstream() -> AsyncIterator[UpstreamFactory]:
    """Starts SDK upstreams on demand (`await mcp_upstream("streamable", token)`); stops them."""
    async with Started() as started:

        async def make(transport: Transport = "streamable",
                       token: str = "good-token") -> McpUpstream:
            return await started.start(McpUpstream(transport, token))

        yield make


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[Processes]:
    """Starts subprocesses for a test (see `processes.py`); stops them all, by pid."""
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        await started.stop_all()


def unwrap(exc: BaseException) -> list[BaseException]:
    """Every leaf exception inside (nested) anyio/asyncio exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        leaves: list[BaseException] = []
        for inner in exc.exceptions:
            leaves.extend(unwrap(inner))
        return leaves
    return [exc]


def status_file(state_dir: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((state_dir / "workloads" / f"{name}.json").read_text())
    return data


@contextlib.asynccontextmanager
async def connect(
    url: str, *, transport: Transport = "streamable", token: str | None = None,
    mode: str = "legacy",
) -> AsyncIterator[Client]:
    """The SDK client connected to `url`, sending `token` itself when given.

    Connecting is bounded: the SDK's SSE client hangs instead of raising when it
    refuses the `endpoint` event (it blocks handing the error to a reader that does not
    exist yet), and a test must fail rather than wait out the suite's timeout.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with contextlib.AsyncExitStack() as stack:
        client: Client
        if transport == "sse":
            client = Client(sse_client(url, headers=headers), mode=mode)
        else:
            # The MCP transports' own defaults: a held stream may stay quiet for minutes.
            http = await stack.enter_async_context(
                httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=300.0))
            )
            client = Client(streamable_http_client(url, http_client=http), mode=mode)
        async with asyncio.timeout(LONG_WAIT):
            await stack.enter_async_context(client)
        yield client


def text_of(result: CallToolResult) -> str:
    """The text of a tool result's first content block."""
    block = result.content[0]
    assert isinstance(block, TextContent), block
    return block.text


async def echoes(client: Client, text: str) -> None:
    """The `echo` tool, called through `client` (bounded), answers `echo: TEXT`."""
    result = await asyncio.wait_for(client.call_tool("echo", {"text": text}), LONG_WAIT)
    assert text_of(result) == f"echo: {text}"


Progress = tuple[float, float | None, str | None]


async def lists_echoes_and_counts(client: Client, upstream: McpUpstream, steps: int
                                  ) -> list[Progress]:
    """Through `client`: `echo` and `count` are listed, `echo` answers, and `count` to
    `steps` finishes unbuffered: the tool waits for the client to see step 1, so a stream
    held back until the end would have made it report "buffered". Returns the progress
    notifications the client saw."""
    seen: list[Progress] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))
        upstream.progress.client_saw_first.set()

    tools = await asyncio.wait_for(client.list_tools(), LONG_WAIT)
    assert {tool.name for tool in tools.tools} >= {"echo", "count"}
    await echoes(client, "héllo")
    counted = await asyncio.wait_for(
        client.call_tool("count", {"steps": steps}, progress_callback=on_progress), LONG_WAIT
    )
    assert text_of(counted) == f"counted to {steps}"
    return seen
