"""`mcp-authproxy demo`: the whole story on an embedded default, start to end.

Starts a small token-protected MCP server on loopback (Streamable HTTP, JSON answers),
puts the proxy in front of it with a bearer token file, and walks a JSON-RPC client
through a working tool call, a revoked token (the workload turns `unauthenticated`,
the callback fires once however many calls fail, a runner's "running" changes
nothing) and a restored token (back to `running`). Every status change is printed.
Exits 0 when every step behaved as described, 1 otherwise. Touches only a temporary
directory and loopback ports.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, hdrs, web

from ..app import AuthProxy
from ..config import ProxyConfig
from ..monitor.auth import ReauthorizedEvent, UnauthorizedEvent

PROTOCOL_VERSION = "2025-06-18"


class DemoServer:
    """A tiny MCP server: initialize, tools/list, tools/call (echo), ping; bearer auth."""

    def __init__(self) -> None:
        self.accepted_token = secrets.token_urlsafe(24)
        self.revoked_description = "The access token was revoked"
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/mcp", self._handle)
        app.router.add_get("/.well-known/oauth-protected-resource", self._metadata)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/mcp"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"resource": self.url})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get(hdrs.AUTHORIZATION) != f"Bearer {self.accepted_token}":
            challenge = (
                f'Bearer error="invalid_token", error_description="{self.revoked_description}", '
                f'resource_metadata="{self.url.rsplit("/", 1)[0]}/.well-known/'
                'oauth-protected-resource"'
            )
            return web.json_response({"error": "unauthorized"}, status=401,
                                     headers={hdrs.WWW_AUTHENTICATE: challenge})
        message = await request.json()
        if "id" not in message:
            return web.Response(status=202)
        method = message.get("method")
        result: dict[str, Any]
        if method == "initialize":
            result = {"protocolVersion": PROTOCOL_VERSION, "capabilities": {"tools": {}},
                      "serverInfo": {"name": "demo-server", "version": "1.0"}}
        elif method == "tools/list":
            result = {"tools": [{"name": "echo", "description": "Echoes its text",
                                 "inputSchema": {"type": "object",
                                                 "properties": {"text": {"type": "string"}}}}]}
        elif method == "tools/call":
            text = message.get("params", {}).get("arguments", {}).get("text", "")
            result = {"content": [{"type": "text", "text": f"echo: {text}"}], "isError": False}
        elif method == "ping":
            result = {}
        else:
            return web.json_response({"jsonrpc": "2.0", "id": message["id"],
                                      "error": {"code": -32601, "message": "no such method"}})
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result},
                                 headers={"Mcp-Session-Id": "demo-session"})


class Story:
    def __init__(self) -> None:
        self.unauthorized: list[UnauthorizedEvent] = []
        self.reauthorized: list[ReauthorizedEvent] = []
        self.reauthorized_seen = asyncio.Event()
        self.failures: list[str] = []
        self._last = ""

    def say(self, text: str) -> None:
        print(text, flush=True)

    def show(self, proxy: AuthProxy) -> None:
        record = proxy.status
        line = f"{record.status} ({record.reason}: {record.message})"
        if line != self._last:
            self.say(f"    status -> {line}")
            self._last = line

    def expect(self, what: str, ok: bool) -> None:
        if not ok:
            self.failures.append(what)
            self.say(f"    !! expected: {what}")

    def on_unauthorized(self, event: UnauthorizedEvent) -> None:
        self.unauthorized.append(event)
        self.say(f"    callback on_unauthorized: {event.reason}, error={event.error!r}, "
                 f"{event.error_description!r}")

    def on_reauthorized(self, event: ReauthorizedEvent) -> None:
        self.reauthorized.append(event)
        self.reauthorized_seen.set()
        self.say("    callback on_reauthorized: the credential works again")


async def _call(session: ClientSession, url: str, method: str, ident: int,
                params: dict[str, Any] | None = None) -> tuple[int, Any]:
    body = {"jsonrpc": "2.0", "id": ident, "method": method, "params": params or {}}
    async with session.post(url, json=body, headers={
        hdrs.ACCEPT: "application/json, text/event-stream",
        "MCP-Protocol-Version": PROTOCOL_VERSION,
    }) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None)


async def _demo(state_dir: Path) -> int:
    story = Story()
    server = DemoServer()
    await server.start()
    token_file = state_dir / "token"
    token_file.write_text(server.accepted_token + "\n")
    token_file.chmod(0o600)
    config = ProxyConfig(target_url=server.url, name="demo", state_dir=state_dir,
                         bearer_token_file=token_file, health_interval=0, log_level="warning")
    story.say(f"1. demo MCP server at {server.url}, token file {token_file}")
    try:
        async with AuthProxy(config, on_unauthorized=story.on_unauthorized,
                             on_reauthorized=story.on_reauthorized) as proxy, \
                ClientSession() as client:
            story.say(f"2. proxy listening at {proxy.url}")
            story.show(proxy)
            status, answer = await _call(client, proxy.url, "initialize", 1,
                                         {"protocolVersion": PROTOCOL_VERSION,
                                          "capabilities": {},
                                          "clientInfo": {"name": "demo-client", "version": "1"}})
            story.expect("initialize answered 200", status == 200)
            status, answer = await _call(client, proxy.url, "tools/call", 2,
                                         {"name": "echo", "arguments": {"text": "hello"}})
            story.say(f"3. tools/call echo -> HTTP {status}: "
                      f"{answer['result']['content'][0]['text'] if status == 200 else answer}")
            story.expect("tools/call answered 200", status == 200)
            story.show(proxy)

            story.say("4. the server revokes the token; the client calls three times")
            server.accepted_token = secrets.token_urlsafe(24)
            for ident in (3, 4, 5):
                status, answer = await _call(client, proxy.url, "tools/call", ident,
                                             {"name": "echo", "arguments": {"text": "again"}})
                error = answer.get("error") if isinstance(answer, dict) else None
                story.say(f"    tools/call -> HTTP {status} {error} (the proxy owns the "
                          "credential: the client is told to retry, not to sign in)")
                story.expect("the client gets 503 upstream_unauthorized",
                             status == 503 and error == "upstream_unauthorized")
            await proxy.monitor.flush()
            story.show(proxy)
            story.expect("status is unauthenticated", proxy.status.status == "unauthenticated")
            story.expect("on_unauthorized fired exactly once", len(story.unauthorized) == 1)

            story.say("5. a runner says 'running': the status is kept")
            record = await proxy.set_running()
            story.show(proxy)
            story.expect("set_running keeps unauthenticated", record.status == "unauthenticated")

            story.say("6. the user writes the new token to the token file")
            token_file.write_text(server.accepted_token + "\n")
            for ident in range(6, 56):
                status, _ = await _call(client, proxy.url, "tools/call", ident,
                                        {"name": "echo", "arguments": {"text": "back"}})
                if status == 200:
                    break
                await asyncio.sleep(0.1)  # the file watcher re-reads within a second
            story.say(f"    tools/call -> HTTP {status}")
            story.expect("the call succeeds with the new token", status == 200)
            await asyncio.wait_for(story.reauthorized_seen.wait(), 5)
            await proxy.monitor.flush()
            story.show(proxy)
            story.expect("status is running again", proxy.status.status == "running")
        record_text = (state_dir / "workloads" / "demo.json").read_text()
        story.say(f"7. proxy stopped; status file says {json.loads(record_text)['status']}")
        story.expect("no credential in the status file", server.accepted_token not in record_text)
    finally:
        await server.stop()
    if story.failures:
        story.say(f"demo FAILED: {len(story.failures)} step(s) did not behave")
        return 1
    story.say("demo OK: one episode, one callback, status preserved until the proof")
    return 0


def run_demo() -> int:
    from .. import log

    log.configure("warning", None, sys.stderr)
    with tempfile.TemporaryDirectory(prefix="mcp-authproxy-demo-") as tmp:
        return asyncio.run(_demo(Path(tmp)))
