"""An MCP target protected by the test authorization server, the way MCP servers are.

The official SDK's `MCPServer` (Streamable HTTP) served by uvicorn on loopback, behind
an ASGI gate that does what an MCP resource server does (MCP authorization spec):

- serves its RFC 9728 protected resource metadata at
  `/.well-known/oauth-protected-resource/mcp`, naming the authorization server;
- validates every bearer token by RFC 7662 introspection at that server (so a revoked
  grant is refused at once), including that the token was issued for this resource;
- answers 401 with `WWW-Authenticate: Bearer error=..., resource_metadata=..., scope=...`
  and, for tools that need more scope, 403 `insufficient_scope` naming it.

Knobs the tests turn: `advertise_metadata` (leave `resource_metadata` out of the 401, so
discovery must fall back to the well-known URLs), `claimed_resource` (metadata speaking
for another resource), `issuer_override` (metadata naming another issuer URL).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from mcp.server.mcpserver import MCPServer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from helpers import UvicornServer

READ_SCOPE = "mcp:read"
WRITE_SCOPE = "mcp:write"


@dataclass(slots=True)
class GateSettings:
    issuer: str
    introspection_url: str
    rs_client: tuple[str, str]
    advertise_metadata: bool = True
    claimed_resource: str | None = None
    issuer_override: str | None = None
    seen_tokens: list[str | None] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


def build_server() -> MCPServer:
    server = MCPServer("signin-target", log_level="WARNING")

    @server.tool()
    def echo(text: str) -> str:
        """Echoes its text back (needs mcp:read)."""
        return f"echo: {text}"

    @server.tool()
    def write(text: str) -> str:
        """Pretends to write (needs mcp:write)."""
        return f"wrote: {text}"

    return server


class OAuthGate:
    """ASGI middleware: RFC 9728 metadata, introspection, 401/403 challenges."""

    def __init__(self, app: ASGIApp, settings: GateSettings, resource: str) -> None:
        self.app = app
        self.settings = settings
        self.resource = resource
        self._session: aiohttp.ClientSession | None = None

    @property
    def metadata_url(self) -> str:
        origin = self.resource.rsplit("/", 1)[0]
        return f"{origin}/.well-known/oauth-protected-resource/mcp"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith("/.well-known/oauth-protected-resource"):
            if scope["path"] != "/.well-known/oauth-protected-resource/mcp":
                await _json(send, 404, {"error": "not_found"})
                return
            await _json(send, 200, {
                "resource": self.settings.claimed_resource or self.resource,
                "authorization_servers": [self.settings.issuer_override
                                          or self.settings.issuer],
                "scopes_supported": [READ_SCOPE, WRITE_SCOPE],
                "bearer_methods_supported": ["header"],
            })
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        self.settings.seen_tokens.append(token)
        body, receive = await _buffer(receive)
        info = await self._introspect(token) if token else None
        if info is None:
            await self._challenge(send, 401, "invalid_token", "The access token is not valid",
                                  READ_SCOPE)
            return
        granted = set(str(info.get("scope", "")).split())
        if READ_SCOPE not in granted:
            await self._challenge(send, 403, "insufficient_scope", "needs mcp:read", READ_SCOPE)
            return
        if _calls_tool(body, "write") and WRITE_SCOPE not in granted:
            await self._challenge(send, 403, "insufficient_scope", "writing needs mcp:write",
                                  f"{READ_SCOPE} {WRITE_SCOPE}")
            return
        self.settings.statuses.append(200)
        await self.app(scope, receive, send)

    async def _introspect(self, token: str) -> dict[str, Any] | None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        auth = aiohttp.encode_basic_auth(*self.settings.rs_client)
        async with self._session.post(self.settings.introspection_url,
                                      headers={"Authorization": auth},
                                      data={"token": token}) as response:
            info = await response.json()
        if not info.get("active"):
            return None
        audience = info.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if self.resource not in audiences:
            return None  # issued for another resource
        return dict(info)

    async def _challenge(self, send: Send, status: int, error: str, description: str,
                         scope: str) -> None:
        self.settings.statuses.append(status)
        parts = [f'error="{error}"', f'error_description="{description}"', f'scope="{scope}"']
        if self.settings.advertise_metadata:
            parts.append(f'resource_metadata="{self.metadata_url}"')
        await _json(send, status, {"error": error, "error_description": description},
                    [(b"www-authenticate", ("Bearer " + ", ".join(parts)).encode())])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _calls_tool(body: bytes, name: str) -> bool:
    try:
        message = json.loads(body)
    except ValueError:
        return False
    return (isinstance(message, dict) and message.get("method") == "tools/call"
            and isinstance(message.get("params"), dict)
            and message["params"].get("name") == name)


async def _buffer(receive: Receive) -> tuple[bytes, Receive]:
    """The whole request body, and a `receive` that replays it to the inner app."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"", receive
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


async def _json(send: Send, status: int, doc: dict[str, Any],
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(doc).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


class ProtectedTarget:
    """The SDK server behind `OAuthGate`, on 127.0.0.1 in this test's event loop."""

    def __init__(self, settings: GateSettings) -> None:
        self.settings = settings
        self._server = UvicornServer()
        self.port = self._server.port
        self.mcp = build_server()
        self.gate = OAuthGate(self.mcp.streamable_http_app(host="127.0.0.1"), settings,
                              self.url)

    @property
    def url(self) -> str:
        return f"{self._server.origin}/mcp"

    async def start(self) -> None:
        await self._server.start(self.gate)

    async def stop(self) -> None:
        try:
            await self._server.stop()
        finally:
            await self.gate.close()
