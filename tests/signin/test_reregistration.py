"""A client registration the authorization server forgot (Dynamic Client Registration,
`invalid_client`): `login` registers anew once and signs in; `run --oauth` asks for a
login and never registers by itself. Against node-oidc-provider restarted on the same
port, which forgets every client it registered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy import AuthProxy

from .conftest import (
    AuthServer,
    Cli,
    Result,
    TargetFactory,
    open_in_browser,
    registrations,
    restart_authserver,
    start_authserver,
)
from .test_run_oauth import call_tool, initialize, signin_config
from helpers import SLOW_WAIT, Episodes

pytestmark = pytest.mark.timeout(120)
LOGIN_TIMEOUT = "20"  # bounds a login that waits for an answer that never comes


class Forgetful:
    """An authorization server of this test's own, restartable."""

    def __init__(self, log: Path) -> None:
        self.server = start_authserver(log)

    def forget_clients(self) -> None:
        self.server = restart_authserver(self.server)


@pytest.fixture
def forgetful(tmp_path: Path) -> Iterator[Forgetful]:
    holder = Forgetful(tmp_path / "forgetful-as.log")
    yield holder
    holder.server.stop()


async def device_login(cli: Cli, *args: str) -> Result:
    """`login ARGS --device`, the person confirming the code it shows."""
    async with cli.started("login", *args, "--device", "--timeout", LOGIN_TIMEOUT
                           ) as running:
        complete = await running.stderr_line("(or open ")
        url = complete.split("(or open ", 1)[1].rstrip(")")
        assert await open_in_browser(url, "--device") == 0
        return await running.finish()


def registration_files(cli: Cli) -> list[Path]:
    return sorted((cli.state_dir / "credentials" / "clients").glob("*.json"))


async def test_login_registers_anew_when_the_client_was_forgotten(
        cli: Cli, forgetful: Forgetful, make_target: TargetFactory) -> None:
    """`login NAME` with a stored registration the server no longer knows drops it,
    registers once more and completes the sign-in with the new client."""
    server: AuthServer = forgetful.server
    target = await make_target(server)
    first = await cli.login("--target-url", target.url, "--name", "dcr")
    assert first.code == 0, first.stderr
    old_client = cli.signin("dcr")["client_id"]
    assert registrations(server) == [old_client]

    forgetful.forget_clients()
    again = await cli.login("dcr", "--timeout", LOGIN_TIMEOUT)

    assert again.code == 0, again.stderr
    signin = cli.signin("dcr")
    assert signin["client_id"] != old_client
    assert registrations(forgetful.server) == [old_client, signin["client_id"]]
    [kept] = registration_files(cli)
    assert json.loads(kept.read_text())["client_id"] == signin["client_id"]
    assert oct(kept.stat().st_mode & 0o777) == "0o600"
    submits = [s.get("form") for s in cli.browser_steps() if s["step"] == "submit"]
    assert submits == ["login", "consent", "login", "consent"]


async def test_device_login_registers_anew_when_the_client_was_forgotten(
        cli: Cli, forgetful: Forgetful, make_target: TargetFactory) -> None:
    """The device grant too: a forgotten registration is replaced once, not reported
    as the server's `invalid_client`."""
    target = await make_target(forgetful.server)
    first = await device_login(cli, "--target-url", target.url, "--name", "dev")
    assert first.code == 0, first.stderr
    old_client = cli.signin("dev")["client_id"]

    forgetful.forget_clients()
    again = await device_login(cli, "dev")

    assert again.code == 0, again.stderr
    new_client = cli.signin("dev")["client_id"]
    assert new_client != old_client
    assert registrations(forgetful.server) == [old_client, new_client]


async def test_run_oauth_asks_for_login_and_never_registers(
        cli: Cli, forgetful: Forgetful, make_target: TargetFactory) -> None:
    """`run --oauth` whose client the server forgot: the refresh's `invalid_client` is
    LoginRequired naming `mcp-authproxy login NAME` (one episode, 503s), the proxy
    registers nothing; `login NAME` then registers once and heals the same process."""
    target = await make_target(forgetful.server)
    assert (await cli.login("--target-url", target.url, "--name", "gone")).code == 0
    old_client = cli.signin("gone")["client_id"]
    episodes = Episodes()
    config = signin_config(cli, target, "gone")
    async with AuthProxy(config, on_unauthorized=episodes.on_unauthorized,
                         on_reauthorized=episodes.on_reauthorized) as running, \
            aiohttp.ClientSession() as session:
        assert await call_tool(running.url, "echo") == "echo: hi"
        forgetful.forget_clients()  # the token and the client are gone with it

        answers = [await initialize(session, running.url) for _ in range(3)]
        await asyncio.wait_for(episodes.opened.wait(), SLOW_WAIT)
        during = running.status
        registered_meanwhile = registrations(forgetful.server)

        login = await cli.login("gone", "--timeout", LOGIN_TIMEOUT)
        assert login.code == 0, login.stderr
        assert await call_tool(running.url, "echo", "healed") == "echo: healed"
        await asyncio.wait_for(episodes.closed.wait(), SLOW_WAIT)
        after = running.status

    for status, headers, body in answers:
        assert status == 503, (status, body)
        assert "WWW-Authenticate" not in headers
        assert "mcp-authproxy login gone" in json.loads(body)["message"]
    assert during.status == "unauthenticated"
    assert during.reason == "LoginRequired"
    assert "invalid_client" in during.message
    assert "mcp-authproxy login gone" in during.message
    assert registered_meanwhile == [old_client]  # the proxy registered nothing
    assert len(episodes.unauthorized) == 1
    new_client = cli.signin("gone")["client_id"]
    assert registrations(forgetful.server) == [old_client, new_client]
    assert after.status == "running"
    assert len(episodes.reauthorized) == 1
