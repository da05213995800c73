"""`run --oauth`: the stored sign-in as the credential, refreshed, lost and healed again
without a restart, against node-oidc-provider and an official-SDK MCP target.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import pty
import shlex
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp import MCPError
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import TextContent

from proxy import AuthProxy, ProxyConfig

from .conftest import AuthServer, Cli, TargetFactory
from .target import ProtectedTarget
from helpers import SLOW_WAIT, Episodes, eventually

pytestmark = pytest.mark.timeout(120)
WAIT = SLOW_WAIT  # a real SDK, a subprocess and a browser script on a loaded machine


@contextlib.asynccontextmanager
async def sdk_client(url: str) -> AsyncIterator[Client]:
    """The official SDK's client, connected to `url` (bounded)."""
    # Without an http_client the SDK makes its own, with the MCP transports' timeouts.
    async with contextlib.AsyncExitStack() as stack:
        client = Client(streamable_http_client(url))
        async with asyncio.timeout(WAIT):
            await stack.enter_async_context(client)
        yield client


async def call_tool(url: str, tool: str, text: str = "hi") -> str:
    async with sdk_client(url) as client:
        result = await client.call_tool(tool, {"text": text})
    block = result.content[0]
    assert isinstance(block, TextContent), block
    return block.text


async def initialize(session: aiohttp.ClientSession, url: str,
                     ) -> tuple[int, dict[str, str], bytes]:
    """A raw MCP `initialize` through the proxy: status, headers, body."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"}}}
    async with session.post(url, json=body, headers={
            "Accept": "application/json, text/event-stream"}) as response:
        return response.status, dict(response.headers), await response.read()


async def revoke_grant(server: AuthServer, signin: dict[str, Any]) -> None:
    """What an administrator (or the user, elsewhere) does: revoke the refresh token,
    which revokes the whole grant and its access tokens with it."""
    async with aiohttp.ClientSession() as session, session.post(
            server.url("/token/revocation"),
            data={"token": signin["refresh_token"], "token_type_hint": "refresh_token",
                  "client_id": signin["client_id"]}) as response:
        assert response.status == 200


def signin_config(cli: Cli, target: ProtectedTarget, name: str, **extra: Any) -> ProxyConfig:
    return ProxyConfig(target_url=target.url, name=name, state_dir=cli.state_dir, oauth=True,
                       health_interval=0, **extra)


async def test_run_oauth_serves_an_sdk_client(cli: Cli, target: ProtectedTarget) -> None:
    """`run --oauth` after `login` serves the official SDK client with the stored token,
    and the client never sees or sends a credential of its own."""
    login = await cli.login("--target-url", target.url, "--name", "sdk")
    assert login.code == 0, login.stderr
    stored = cli.signin("sdk")
    before = len(target.settings.seen_tokens)  # login's own unauthenticated probe

    async with cli.started("run", "--oauth", "--target-url", target.url, "--name", "sdk",
                           "--health-interval", "0") as running:
        url = await running.stdout_line()
        assert await call_tool(url, "echo", "through the proxy") == "echo: through the proxy"
        status = json.loads((cli.state_dir / "workloads" / "sdk.json").read_text())
        assert status["status"] == "running"
        running.process.terminate()
        result = await running.finish()

    assert result.code == 0
    assert result.stdout == ""  # nothing after the one URL line
    for secret in (stored["access_token"], stored["refresh_token"]):
        assert secret not in result.stderr

    assert set(target.settings.seen_tokens[before:]) == {stored["access_token"]}


async def test_no_sign_in_is_login_required(cli: Cli, target: ProtectedTarget) -> None:
    """Without a stored sign-in the workload is `unauthenticated` with reason
    LoginRequired naming the command; clients get 503, the callback fires once."""
    episodes = Episodes()
    config = signin_config(cli, target, "fresh")
    async with AuthProxy(config, on_unauthorized=episodes.on_unauthorized) as running, \
            aiohttp.ClientSession() as session:
        await asyncio.wait_for(episodes.opened.wait(), WAIT)
        answers = await asyncio.gather(*(initialize(session, running.url) for _ in range(3)))
        record = running.status

    assert record.status == "unauthenticated"
    assert record.reason == "LoginRequired"
    assert "mcp-authproxy login fresh" in record.message
    for status, headers, body in answers:
        assert status == 503
        assert int(headers["Retry-After"]) >= 1
        assert "WWW-Authenticate" not in headers
        assert "mcp-authproxy login fresh" in json.loads(body)["message"]
    assert len(episodes.unauthorized) == 1
    assert episodes.unauthorized[0].reason == "LoginRequired"
    assert target.settings.seen_tokens == []  # nothing reached the target


async def scrape_metrics(admin_port: int | None) -> dict[str, float]:
    """The admin `/metrics`, parsed as Prometheus parses it: unlabelled samples by name,
    labelled ones as `name{k=v,...}`."""
    from prometheus_client.parser import text_string_to_metric_families

    assert admin_port is not None
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{admin_port}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def test_token_expiry_is_known_right_after_start(
        cli: Cli, target: ProtectedTarget) -> None:
    """Started from a stored sign-in whose token is still valid, the proxy's /metrics
    shows the token's remaining lifetime at once, before any refresh happened."""
    assert (await cli.login("--target-url", target.url, "--name", "gauge")).code == 0
    stored = cli.signin("gauge")
    config = signin_config(cli, target, "gauge", admin_port=0)
    async with AuthProxy(config) as running:
        samples = await scrape_metrics(running.admin_port)
        remaining = (datetime.fromisoformat(stored["expires_at"])
                     - datetime.now(UTC)).total_seconds()

    expiry = samples["mcp_authproxy_token_expiry_seconds"]
    assert expiry > 0  # known: not NaN, not the 0 of an absent gauge
    assert abs(expiry - remaining) < 30, (expiry, remaining)
    refreshes = {k: v for k, v in samples.items()
                 if k.startswith("mcp_authproxy_token_refreshes_total")}
    assert refreshes and set(refreshes.values()) == {0.0}, refreshes
    assert cli.signin("gauge")["refresh_token"] == stored["refresh_token"]


async def test_token_expiry_follows_a_sign_in_picked_up(
        cli: Cli, target: ProtectedTarget) -> None:
    """Started with no sign-in the expiry is unknown (NaN); a `login` the running proxy
    picks up makes it known at once, with no refresh counted."""
    config = signin_config(cli, target, "later", admin_port=0)
    async with AuthProxy(config) as running:
        before = await scrape_metrics(running.admin_port)
        assert (await cli.login("--target-url", target.url, "--name", "later")).code == 0
        assert await _eventually(running.url, "echo", "signed in") == "echo: signed in"
        after = await scrape_metrics(running.admin_port)
        remaining = (datetime.fromisoformat(cli.signin("later")["expires_at"])
                     - datetime.now(UTC)).total_seconds()

    assert math.isnan(before["mcp_authproxy_token_expiry_seconds"])
    expiry = after["mcp_authproxy_token_expiry_seconds"]
    assert abs(expiry - remaining) < 30, (expiry, remaining)
    assert after["mcp_authproxy_token_refreshes_total{outcome=success}"] == 0


async def test_expiry_refreshes_and_writes_the_rotated_token_back(
        cli: Cli, short_lived_authserver: AuthServer, make_target: TargetFactory) -> None:
    """Access tokens that live 3 s are refreshed ahead of expiry; each rotated refresh
    token is written back to the same sign-in, and requests keep working."""
    target = await make_target(short_lived_authserver)
    assert (await cli.login("--target-url", target.url, "--name", "short")).code == 0
    first = cli.signin("short")

    async with AuthProxy(signin_config(cli, target, "short")) as running:
        assert await call_tool(running.url, "echo") == "echo: hi"
        await eventually(
            lambda: cli.signin("short")["refresh_token"] != first["refresh_token"],
            SLOW_WAIT, what="a rotated refresh token written back")
        second = cli.signin("short")
        assert await call_tool(running.url, "echo", "later") == "echo: later"
        assert running.status.status == "running"

    assert second["signin_id"] == first["signin_id"]
    assert second["access_token"] != first["access_token"]
    assert second["expires_at"] > first["expires_at"]
    assert second["access_token"] in target.settings.seen_tokens
    mode = (cli.signin_file("short").stat().st_mode & 0o777)
    assert mode == 0o600


async def test_revoked_grant_login_again_heals_the_same_process(
        cli: Cli, authserver: AuthServer, target: ProtectedTarget) -> None:
    """A revoked grant: LoginRequired, one callback, 503s (never 401) while it lasts;
    `mcp-authproxy login NAME` then heals the running proxy, no restart."""
    assert (await cli.login("--target-url", target.url, "--name", "desk")).code == 0
    episodes = Episodes()
    config = signin_config(cli, target, "desk")
    async with AuthProxy(config, on_unauthorized=episodes.on_unauthorized,
                         on_reauthorized=episodes.on_reauthorized) as running, \
            aiohttp.ClientSession() as session:
        assert await call_tool(running.url, "echo") == "echo: hi"
        revoked = cli.signin("desk")
        await revoke_grant(authserver, revoked)

        answers = await asyncio.gather(*(initialize(session, running.url) for _ in range(4)))
        await asyncio.wait_for(episodes.opened.wait(), WAIT)
        during = running.status
        more = await initialize(session, running.url)

        login = await cli.login("desk")  # NAME only: the target comes from the sign-in
        assert login.code == 0, login.stderr
        assert await call_tool(running.url, "echo", "healed") == "echo: healed"
        await asyncio.wait_for(episodes.closed.wait(), WAIT)
        after = running.status

    for status, headers, body in [*answers, more]:
        assert status == 503, (status, body)
        assert "WWW-Authenticate" not in headers
        assert "mcp-authproxy login desk" in json.loads(body)["message"]
    assert during.status == "unauthenticated"
    assert during.reason == "LoginRequired"
    assert "mcp-authproxy login desk" in during.message
    assert len(episodes.unauthorized) == 1
    assert after.status == "running"
    assert len(episodes.reauthorized) == 1
    status_file = (cli.state_dir / "workloads" / "desk.json").read_text()
    event = json.dumps(episodes.unauthorized[0].to_dict())
    for signin in (revoked, cli.signin("desk")):
        for key in ("access_token", "refresh_token"):
            assert signin[key] not in status_file and signin[key] not in event


async def test_pass_401_keeps_the_old_pass_through(
        cli: Cli, authserver: AuthServer, target: ProtectedTarget) -> None:
    """With `--pass-401` the target's 401 and its challenge reach the client unchanged."""
    assert (await cli.login("--target-url", target.url, "--name", "pass")).code == 0
    config = signin_config(cli, target, "pass", pass_401=True)
    async with AuthProxy(config) as running, aiohttp.ClientSession() as session:
        await revoke_grant(authserver, cli.signin("pass"))
        status, headers, _ = await initialize(session, running.url)

    assert status == 401
    assert "resource_metadata=" in headers["WWW-Authenticate"]


async def test_step_up_asks_for_the_missing_scope(
        cli: Cli, target: ProtectedTarget) -> None:
    """403 insufficient_scope: `Authorized` False naming the scopes, the client gets a
    403 JSON without a challenge, and `login NAME` asks for the stored scopes plus those;
    the running proxy then uses the wider sign-in."""
    first = await cli.login("--target-url", target.url, "--name", "up", "--scope",
                            "mcp:read")
    assert first.code == 0, first.stderr
    async with AuthProxy(signin_config(cli, target, "up")) as running, \
            aiohttp.ClientSession() as session:
        assert await call_tool(running.url, "echo") == "echo: hi"
        async with sdk_client(running.url) as client:
            with pytest.raises(MCPError):  # the 403 reaches the client as an MCP error
                await client.call_tool("write", {"text": "x"})
        status, headers, body = await _call_write_raw(session, running.url)

        def authorized() -> Any:
            return next(c for c in running.status.conditions if c.type == "Authorized")

        await eventually(lambda: authorized().status is False, SLOW_WAIT,
                         what="Authorized turns False")
        denied = authorized()

        again = await cli.login("up")
        assert again.code == 0, again.stderr
        assert await _eventually(running.url, "write", "now") == "wrote: now"

    assert status == 403
    assert "WWW-Authenticate" not in headers
    assert json.loads(body)["error"] == "insufficient_scope"
    assert "mcp-authproxy login up" in json.loads(body)["message"]
    assert "mcp:write" in denied.message
    assert again.stdout.split()[2:] == ["mcp:read", "mcp:write"]


async def _call_write_raw(session: aiohttp.ClientSession, url: str
                          ) -> tuple[int, dict[str, str], bytes]:
    """A session, then a raw `tools/call write` inside it."""
    status, headers, _ = await initialize(session, url)
    assert status == 200
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "write", "arguments": {"text": "x"}}}
    async with session.post(url, json=call, headers={
            "Accept": "application/json, text/event-stream",
            "Mcp-Session-Id": headers.get("mcp-session-id", ""),
            "MCP-Protocol-Version": "2025-11-25"}) as response:
        return response.status, dict(response.headers), await response.read()


def test_credentials_path_is_per_workload(tmp_path: Path) -> None:
    """The sign-in lives at <state-dir>/credentials/<name>.json, as the contract pins."""
    from proxy.credentials.signin_store import signin_path

    assert signin_path(tmp_path, "w") == tmp_path / "credentials" / "w.json"


@contextlib.asynccontextmanager
async def on_a_terminal(cli: Cli, target: ProtectedTarget, name: str
                        ) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, list[bytes]]]:
    """`run --oauth` with its stderr on a pseudo-terminal, as a person starts it: the
    process, its URL, and what it wrote to the terminal."""
    master, slave = pty.openpty()
    seen: list[bytes] = []
    threading.Thread(target=_drain, args=(master, seen), daemon=True).start()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--oauth", "--target-url", target.url,
        "--name", name, "--health-interval", "0", env=cli.env(),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    try:
        assert process.stdout is not None
        url = (await asyncio.wait_for(process.stdout.readline(), WAIT)).decode().strip()
        yield process, url, seen
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), WAIT)
        os.close(master)


async def test_interactive_run_oauth_signs_in_by_itself(cli: Cli, target: ProtectedTarget
                                                        ) -> None:
    """`run --oauth` on a terminal with no sign-in stored starts the sign-in itself (the
    browser), answers 503 meanwhile, and then serves the client: same process."""
    async with on_a_terminal(cli, target, "tty") as (process, url, seen):
        await eventually(lambda: cli.signin_file("tty").exists(), SLOW_WAIT,
                         what="the sign-in stored")
        assert await _eventually(url, "echo", "signed in") == "echo: signed in"
        status = json.loads((cli.state_dir / "workloads" / "tty.json").read_text())
        assert status["status"] == "running"
        assert status["pid"] == process.pid
        assert process.returncode is None

    steps = [s.get("form") for s in cli.browser_steps() if s["step"] == "submit"]
    assert steps == ["login", "consent"]
    assert cli.signin("tty")["access_token"].encode() not in b"".join(seen)


async def test_interactive_run_oauth_steps_up_by_itself(cli: Cli, target: ProtectedTarget
                                                        ) -> None:
    """On a terminal, a 403 insufficient_scope starts `login NAME` for the wider scope;
    the same process then serves the call that needed it."""
    first = await cli.login("--target-url", target.url, "--name", "wide", "--scope",
                            "mcp:read")
    assert first.code == 0, first.stderr
    async with on_a_terminal(cli, target, "wide") as (process, url, _):
        async with sdk_client(url) as client:
            with pytest.raises(MCPError):  # the 403 reaches the client as an MCP error
                await client.call_tool("write", {"text": "x"})
        assert await _eventually(url, "write", "wider") == "wrote: wider"
        assert process.returncode is None

    assert cli.signin("wide")["scope"] == "mcp:read mcp:write"


async def test_desktop_recipe_recovers_without_a_restart(
        cli: Cli, authserver: AuthServer, target: ProtectedTarget) -> None:
    """The README's recipe, `--on-unauthorized-exec "mcp-authproxy login NAME"`: a revoked
    grant opens one episode whose callback signs in again, and the same process serves
    the client afterwards."""
    assert (await cli.login("--target-url", target.url, "--name", "desk2")).code == 0
    login = shlex.join([sys.executable, "-m", "proxy", "login", "desk2"])
    async with cli.started("run", "--oauth", "--target-url", target.url, "--name", "desk2",
                           "--health-interval", "0", "--on-unauthorized-exec",
                           login) as running:
        url = await running.stdout_line()
        assert await call_tool(url, "echo") == "echo: hi"
        before = cli.signin("desk2")
        await revoke_grant(authserver, before)
        async with aiohttp.ClientSession() as session:
            status, _, _ = await initialize(session, url)
        assert status == 503
        await eventually(lambda: cli.signin("desk2")["signin_id"] != before["signin_id"],
                         SLOW_WAIT, what="the callback signed in again")
        assert await _eventually(url, "echo", "recovered") == "echo: recovered"
        assert running.process.returncode is None

    submits = [s.get("form") for s in cli.browser_steps() if s["step"] == "submit"]
    assert submits == ["login", "consent", "login", "consent"]


def _drain(fd: int, into: list[bytes]) -> None:
    """Reads the terminal so that the proxy never blocks writing its logs to it."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return
        if not chunk:
            return
        into.append(chunk)


async def _eventually(url: str, tool: str, text: str) -> str:
    """The tool's answer once the proxy has the sign-in it needs (bounded)."""

    async def answer() -> str | None:
        try:
            return await call_tool(url, tool, text)
        except Exception:  # not yet: the SDK raises its own errors for a 503
            return None

    return await eventually(answer, SLOW_WAIT, what=f"{tool} answered", every=0.2)
