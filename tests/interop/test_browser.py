"""A browser in front of the proxy: headless Chromium loads a page from another loopback
port whose script talks MCP to the proxy, with plain `fetch` or with the TypeScript SDK
client bundled for the browser (`node/browser-client.mjs`, bundled by esbuild).

The target (the TS SDK server) answers every request with `Access-Control-Allow-Origin:
*`, so when a foreign page is stopped, only the proxy can have stopped it; the target's
record of what it received shows that nothing got through.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from .processes import (
    NODE,
    NODE_DIR,
    TOKEN,
    WAIT,
    Processes,
    ProxyProcess,
    TsServer,
    chromium_path,
    need_node,
    proxy_for,
    start_ts_server,
)

FOREIGN_HOST = "evil.test"  # resolved to 127.0.0.1 by Chromium's own host rules
PAGE = """<!doctype html>
<meta charset="utf-8">
<title>interop</title>
<script type="module">
const query = new URLSearchParams(location.search);
const mcp = query.get("mcp");
const version = "2025-06-18";
const accept = "application/json, text/event-stream";
const report = (outcome) =>
  fetch("/result", { method: "POST", body: JSON.stringify(outcome) });
const message = (id, method, params) =>
  JSON.stringify({ jsonrpc: "2.0", ...(id === null ? {} : { id }), method, params });
const initialize = message(1, "initialize", {
  protocolVersion: version, capabilities: {},
  clientInfo: { name: "browser", version: "1.0.0" },
});

async function attempt(init) {
  try {
    const response = await fetch(mcp, init);
    return { ok: true, status: response.status, text: await response.text() };
  } catch (error) {
    return { ok: false, error: String(error) };
  }
}

async function session() {
  const init = await fetch(mcp, { method: "POST", body: initialize,
    headers: { "Content-Type": "application/json", Accept: accept } });
  const id = init.headers.get("mcp-session-id");
  const initialized = await init.text();
  const headers = { "Content-Type": "application/json", Accept: accept,
                    "Mcp-Session-Id": id, "MCP-Protocol-Version": version };
  await fetch(mcp, { method: "POST", headers,
                     body: message(null, "notifications/initialized", {}) });
  const call = await fetch(mcp, { method: "POST", headers, body: message(2, "tools/call",
    { name: "echo", arguments: { text: "from the browser" } }) });
  return { session: id, initialize: initialized, status: call.status, call: await call.text() };
}

try {
  if (query.get("mode") === "sdk") {
    const { run } = await import("/bundle.js");
    await report({ ok: true, ...(await run(mcp)) });
  } else if (query.get("mode") === "session") {
    await report({ ok: true, ...(await session()) });
  } else {
    // A JSON POST needs a preflight; a text/plain POST is a "simple" request and
    // goes out without one: the second is what a page can always send.
    const json = await attempt({ method: "POST", body: initialize,
      headers: { "Content-Type": "application/json", Accept: accept } });
    const plain = await attempt({ method: "POST", body: initialize,
      headers: { "Content-Type": "text/plain" } });
    await report({ ok: true, json, plain });
  }
} catch (error) {
  await report({ ok: false, error: String(error) });
}
</script>
"""


@dataclass(slots=True)
class PageServer:
    """Serves the page and receives what its script reports."""

    bundle: Path
    port: int = 0
    results: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def script(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(self.bundle, headers={"Content-Type": "text/javascript"})

    async def result(self, request: web.Request) -> web.Response:
        await self.results.put(json.loads(await request.text()))
        return web.Response(status=204)

    async def next(self) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self.results.get(), WAIT)
        except TimeoutError:
            raise AssertionError(f"the page reported nothing within {WAIT} s") from None


@pytest.fixture(scope="session")
def sdk_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TypeScript SDK client bundled for the browser, built once per run."""
    need_node()
    out = tmp_path_factory.mktemp("bundle") / "bundle.js"
    subprocess.run([NODE, NODE_DIR / "bundle.mjs", out], check=True, timeout=WAIT)
    return out


@pytest.fixture
async def page_server(sdk_bundle: Path) -> AsyncIterator[PageServer]:
    """The page's own origin: a loopback port apart from the proxy's."""
    pages = PageServer(sdk_bundle)
    app = web.Application()
    app.router.add_get("/page.html", pages.page)
    app.router.add_get("/bundle.js", pages.script)
    app.router.add_post("/result", pages.result)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    pages.port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    try:
        yield pages
    finally:
        await runner.cleanup()
        sock.close()


async def open_page(processes: Processes, url: str) -> None:
    """Headless Chromium, its own profile, `FOREIGN_HOST` resolved to loopback."""
    profile = processes.tmp_path / "chromium-profile"
    await processes.start("chromium", [
        chromium_path(), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
        f"--user-data-dir={profile}", f"--host-resolver-rules=MAP {FOREIGN_HOST} 127.0.0.1",
        url,
    ])


@dataclass
class PageRun:
    """A page opened on a proxy in front of the TS SDK server, and what it reported."""

    server: TsServer
    proxy: ProxyProcess
    origin: str
    outcome: dict[str, Any]


async def run_page(processes: Processes, page_server: PageServer, name: str, mode: str,
                   host: str = "127.0.0.1") -> PageRun:
    """The TS SDK server behind a proxy named `name`; `page.html?mode=MODE`, served from
    `host`, opened on the proxy's URL; the page's report (it must have run to its end)."""
    server = await start_ts_server(processes, TOKEN)
    proxy = await proxy_for(processes, server.url("streamable"), name)
    origin = f"http://{host}:{page_server.port}"
    await open_page(processes, f"{origin}/page.html?mode={mode}&mcp={proxy.url}")
    outcome = await page_server.next()
    assert outcome["ok"] is True, outcome
    return PageRun(server, proxy, origin, outcome)


async def test_a_loopback_page_initializes_and_calls_a_tool(
    processes: Processes, page_server: PageServer
) -> None:
    """A page served from another loopback port initializes an MCP session through the
    proxy and gets a tool's answer; the target saw the proxy's credential."""
    run = await run_page(processes, page_server, "browser-ok", "session")
    server, origin, outcome = run.server, run.origin, run.outcome
    assert outcome["session"] and "interop-ts-upstream" in outcome["initialize"]
    assert outcome["status"] == 200 and "echo: from the browser" in outcome["call"]
    posts = [r for r in await server.seen() if r["method"] == "POST"]
    assert len(posts) == 3
    assert all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in posts)
    assert {r["headers"].get("origin") for r in posts} == {origin}


async def test_the_ts_sdk_client_in_a_page_works_through_the_proxy(
    processes: Processes, page_server: PageServer
) -> None:
    """The TypeScript SDK client bundled into a loopback page connects through the proxy,
    lists the tools, calls one and ends its session, as a browser-based MCP client does."""
    run = await run_page(processes, page_server, "browser-sdk", "sdk")
    server, origin, outcome = run.server, run.origin, run.outcome
    assert outcome["server"]["name"] == "interop-ts-upstream"
    assert outcome["tools"] == ["count", "echo", "large", "notify", "release"]
    assert outcome["text"] == "echo: from the SDK in a browser"
    seen = [r for r in await server.seen() if r["method"] != "OPTIONS"]
    assert all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in seen)
    assert {r["headers"].get("origin") for r in seen} == {origin}
    deletes = [r for r in seen if r["method"] == "DELETE"]
    assert [(r["headers"]["mcp-session-id"], r["status"]) for r in deletes] == [
        (outcome["session"], 200)
    ]


async def test_a_foreign_page_gets_403_and_never_reaches_the_target(
    processes: Processes, page_server: PageServer
) -> None:
    """A page from a foreign origin is refused by the proxy, both a preflighted JSON POST
    and a simple text/plain one, although the target itself would allow any origin: the
    target receives nothing at all."""
    run = await run_page(processes, page_server, "browser-foreign", "foreign", FOREIGN_HOST)
    server, proxy, outcome = run.server, run.proxy, run.outcome
    # The browser hides a refused cross-origin answer from the page: both fail to fetch.
    assert outcome["json"]["ok"] is False and outcome["plain"]["ok"] is False, outcome
    assert await server.seen() == []
    refused = [
        (e["method"], e["status"]) for e in proxy.log_events() if e.get("event") == "request"
    ]
    assert ("OPTIONS", 403) in refused and ("POST", 403) in refused
    assert all(status == 403 for _, status in refused), refused
