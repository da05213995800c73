"""The auth story with the TypeScript clients: the token is revoked at the TS server while
the proxy owns the credential, then restored.

What the contract promises (Auth episodes): the status turns `unauthenticated` and the
callback fires once; the client gets the proxy's 503 `upstream_unauthorized` with no
`WWW-Authenticate`, so an OAuth-capable client (the TS SDK with an auth provider,
mcp-remote, MCP Inspector) does not wander off to the target's authorization server;
with `--pass-401` it gets the target's 401 and does go there. After the token is
restored, the client's next request proves it and the status is `running` again.

Each client is run over both transports. On the legacy HTTP+SSE transport the 503 answers
the client's GET of the event stream, and its EventSource reports the status alone
(`Non-200 status code (503)`), not the body: there the proxy's log shows the 503 stood
for the target's 401.

A request the target receives without `X-Forwarded-For` did not come through the proxy:
the client went to the target itself.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from .processes import (
    INITIALIZE,
    TOKEN,
    WAIT,
    EpisodeListener,
    Process,
    Processes,
    ProxyProcess,
    TsServer,
    inspector_cli,
    mcp_remote,
    next_step,
    proxy_for,
    start_ts_server,
    stdio_request,
    ts_client,
)
from helpers import eventually

SIGN_IN_PATHS = ("/register", "/authorize", "/token")


@pytest.fixture
async def episodes(tmp_path: Path) -> AsyncIterator[EpisodeListener]:
    """Hears every unauthorized episode the proxy's `--on-unauthorized-exec` reports."""
    listener = EpisodeListener(tmp_path)
    yield listener
    await listener.stop()


async def revocable(
    processes: Processes, episodes: EpisodeListener, name: str, *, pass_401: bool,
    transport: str = "streamable",
) -> tuple[TsServer, ProxyProcess]:
    """A TS server and the proxy in front of it, reporting episodes to `episodes`."""
    server = await start_ts_server(processes, TOKEN)
    extra = ["--on-unauthorized-exec", await episodes.start()]
    if pass_401:
        extra.append("--pass-401")
    proxy = await proxy_for(processes, server.url(transport), name, *extra)
    return server, proxy


async def revoke(server: TsServer) -> None:
    await server.accept()
    await server.clear()


def went_around_the_proxy(seen: list[dict[str, Any]]) -> list[str]:
    """Requests the target received from the client directly, or for a sign-in."""
    return [
        f"{r['method']} {r['path']}" for r in seen
        if "x-forwarded-for" not in r["headers"] or r["path"] in SIGN_IN_PATHS
    ]


async def one_episode(proxy: ProxyProcess, episodes: EpisodeListener) -> None:
    """Exactly one episode opened, with the target's reason, and the status says so."""
    event = await episodes.next()
    assert event["status_code"] == 401 and event["error"] == "invalid_token"
    assert proxy.status()["status"] == "unauthenticated"  # written before the callback
    assert episodes.events.empty(), "a second unauthorized episode was reported"


def served_503_for_the_targets_401(proxy: ProxyProcess, path: str) -> None:
    """The proxy's log shows its answers to `path` were 503s standing for the target's
    401 (the `upstream_unauthorized` answer): over the legacy transport a client's
    EventSource reports only the status of a failed GET, never the body."""
    answers = [(e["status"], e.get("upstream_status")) for e in proxy.log_events()
               if e.get("event") == "request" and e.get("path") == path
               and e["status"] != 200]
    assert answers and set(answers) == {(503, 401)}, answers


async def back_to_running(proxy: ProxyProcess) -> None:
    """The status is `running` again, and through it all the token reached neither the
    proxy's logs nor its status file."""
    await eventually(lambda: proxy.status()["status"] == "running", WAIT, what="running")
    assert TOKEN not in proxy.process.stderr()
    assert TOKEN not in json.dumps(proxy.status())


# --- TypeScript SDK client ---------------------------------------------------------------


FailedCalls = Callable[[TsServer, list[dict[str, Any]]], Awaitable[None]]


async def ts_client_story(
    processes: Processes, episodes: EpisodeListener, check: FailedCalls, *, pass_401: bool,
    transport: str = "streamable",
) -> None:
    """Runs the TS client (with an OAuth provider) through revoke and restore; `check`
    judges the two calls that failed meanwhile, before the token is restored."""
    server, proxy = await revocable(processes, episodes, "ts-auth", pass_401=pass_401,
                                    transport=transport)
    client = await ts_client(processes, proxy.url, transport=transport, oauth=True,
                             steps="echo,pause,call,call,pause,call")
    assert (await next_step(client))["ok"] is True
    assert (await next_step(client))["text"] == "echo: héllo"
    assert (await next_step(client))["step"] == "pause"
    await revoke(server)
    await client.send("go")
    failed = [await next_step(client), await next_step(client)]
    assert [f["ok"] for f in failed] == [False, False], failed
    await check(server, failed)
    await one_episode(proxy, episodes)

    assert (await next_step(client))["step"] == "pause"
    await server.accept(TOKEN)
    await client.send("go")
    again = await next_step(client)
    assert again == {"step": "call", "ok": True, "text": "echo: again"}
    await back_to_running(proxy)
    assert episodes.events.empty()
    assert (await next_step(client))["step"] == "done"
    assert await client.wait(WAIT) == 0


@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_ts_client_gets_503_and_stays_with_the_proxy(
    processes: Processes, episodes: EpisodeListener, transport: str
) -> None:
    """After the token is revoked, the TS SDK client (OAuth-capable) gets the proxy's 503
    `upstream_unauthorized`, never a challenge, and neither registers nor sends the user
    to the target's authorization server; after restore its next call works."""

    async def check(server: TsServer, failed: list[dict[str, Any]]) -> None:
        for call in failed:
            # Streamable HTTP's error carries the status as `code`, SSE's only in its text.
            assert call["error"].get("code") == 503 or "(HTTP 503)" in call["error"]["message"]
            assert "upstream_unauthorized" in call["error"]["message"]
            assert call["authorizationRedirects"] == []
            exchanges = {(e["status"], e["www_authenticate"]) for e in call["exchanges"]}
            assert exchanges == {(503, None)}
        assert went_around_the_proxy(await server.seen()) == []

    await ts_client_story(processes, episodes, check, pass_401=False, transport=transport)


async def test_ts_client_with_pass_401_gets_the_targets_challenge(
    processes: Processes, episodes: EpisodeListener
) -> None:
    """With `--pass-401` the TS SDK client gets the target's 401 and its challenge, and
    follows `resource_metadata` to the target itself, as the flag means."""

    async def check(server: TsServer, failed: list[dict[str, Any]]) -> None:
        first = failed[0]["exchanges"][0]
        assert first["status"] == 401
        assert 'error="invalid_token"' in first["www_authenticate"]
        metadata = f'{server.origin}/.well-known/oauth-protected-resource/mcp'
        assert f'resource_metadata="{metadata}"' in first["www_authenticate"]
        assert any(e["url"].startswith(server.origin) for e in failed[0]["exchanges"])
        assert "GET /.well-known/oauth-protected-resource/mcp" in went_around_the_proxy(
            await server.seen()
        )

    await ts_client_story(processes, episodes, check, pass_401=True)


# --- mcp-remote ----------------------------------------------------------------------------


async def bridge_initialize(bridge: Process) -> dict[str, Any]:
    return await stdio_request(bridge, 1, "initialize", INITIALIZE)


async def mcp_remote_story(
    processes: Processes, episodes: EpisodeListener, *, pass_401: bool,
    transport: str = "streamable",
) -> tuple[TsServer, ProxyProcess, Process]:
    """A user's app starts mcp-remote after the token was revoked; returns the server
    and that bridge once it has exited; afterwards the token is restored and a new bridge
    lists tools."""
    server, proxy = await revocable(processes, episodes, "remote-auth", pass_401=pass_401,
                                    transport=transport)
    await revoke(server)
    bridge = await mcp_remote(processes, proxy.url, transport)
    await bridge.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                  "params": INITIALIZE}))
    code = await bridge.wait(WAIT)
    assert code != 0
    await one_episode(proxy, episodes)

    await server.accept(TOKEN)
    fresh = await mcp_remote(processes, proxy.url, transport)
    assert "result" in await bridge_initialize(fresh)
    await fresh.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
    listed = await stdio_request(fresh, 2, "tools/list", {})
    assert len(listed["result"]["tools"]) == 5
    await back_to_running(proxy)
    assert episodes.events.empty(), "a second unauthorized episode was reported"
    return server, proxy, bridge


@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_mcp_remote_gets_503_and_never_opens_a_browser(
    processes: Processes, episodes: EpisodeListener, transport: str
) -> None:
    """mcp-remote started while the token is revoked exits on the proxy's 503 (naming
    `upstream_unauthorized` in its log where the transport shows the body), without
    opening a browser, registering or asking the target's authorization server for
    anything; once the token is back a new bridge lists tools."""
    server, proxy, bridge = await mcp_remote_story(processes, episodes, pass_401=False,
                                                   transport=transport)
    if transport == "sse":
        assert "SSE error: Non-200 status code (503)" in bridge.stderr()
        served_503_for_the_targets_401(proxy, "/sse")
    else:
        assert "upstream_unauthorized" in bridge.stderr()
    assert not (processes.tmp_path / "opened").exists()
    # mcp-remote reads the OAuth metadata at every start, a good token or not (the
    # resource metadata through the proxy, the authorization server's from the target
    # itself); what it must not do is sign in there.
    # (Only with `--pass-401` does it fetch the resource metadata from the target too.)
    assert [r for r in went_around_the_proxy(await server.seen())
            if r != "GET /.well-known/oauth-authorization-server"] == []


@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_mcp_remote_with_pass_401_follows_the_targets_challenge(
    processes: Processes, episodes: EpisodeListener, transport: str
) -> None:
    """With `--pass-401`, mcp-remote gets the target's 401 and goes to the target's
    resource metadata itself (and, finding it names another resource, gives up)."""
    server, _, bridge = await mcp_remote_story(processes, episodes, pass_401=True,
                                               transport=transport)
    assert "GET /.well-known/oauth-protected-resource/mcp" in went_around_the_proxy(
        await server.seen()
    )
    assert "does not match" in bridge.stderr()


# --- MCP Inspector's CLI --------------------------------------------------------------------


async def inspector_story(
    processes: Processes, episodes: EpisodeListener, *, pass_401: bool,
    transport: str = "streamable",
) -> tuple[TsServer, ProxyProcess, int, str]:
    """Inspector's CLI lists tools while the token is revoked (its exit code and stderr
    returned), then again after restore, when it works."""
    server, proxy = await revocable(processes, episodes, "inspector-auth", pass_401=pass_401,
                                    transport=transport)
    await revoke(server)
    inspector = await inspector_cli(processes, proxy.url, transport, "--method", "tools/list")
    code = await inspector.wait(WAIT * 2)
    await one_episode(proxy, episodes)

    await server.accept(TOKEN)
    again = await inspector_cli(processes, proxy.url, transport, "--method", "tools/list")
    assert await again.wait(WAIT * 2) == 0, again.stderr()[-2000:]
    await back_to_running(proxy)
    assert episodes.events.empty(), "a second unauthorized episode was reported"
    return server, proxy, code, inspector.stderr()


@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_inspector_cli_gets_503_and_exits_with_the_reason(
    processes: Processes, episodes: EpisodeListener, transport: str
) -> None:
    """Inspector's CLI, with the token revoked, exits 1 with the proxy's 503 (and its
    reason, where the transport shows the body) on stderr, instead of exiting 3 asking
    for a terminal to sign in."""
    server, proxy, code, stderr = await inspector_story(processes, episodes, pass_401=False,
                                                        transport=transport)
    assert code == 1, stderr
    error = json.loads(stderr.strip().splitlines()[-1])["error"]
    assert error["status"] == 503
    if transport == "sse":
        assert error["message"] == "SSE error: Non-200 status code (503)"
        served_503_for_the_targets_401(proxy, "/sse")
    else:
        assert "upstream_unauthorized" in error["message"]
    assert went_around_the_proxy(await server.seen()) == []


@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_inspector_cli_with_pass_401_asks_for_a_sign_in(
    processes: Processes, episodes: EpisodeListener, transport: str
) -> None:
    """With `--pass-401`, Inspector's CLI sees the target's 401 and exits 3, asking for a
    terminal to run the target's OAuth sign-in."""
    _, _, code, stderr = await inspector_story(processes, episodes, pass_401=True,
                                               transport=transport)
    assert code == 3, stderr
    assert json.loads(stderr.strip().splitlines()[-1])["error"]["code"] == "auth_required"
