"""`mcp-authproxy login` against a real authorization server (node-oidc-provider).

The person is `browser.py`, started by the CLI as `$BROWSER` (or by the test, where the
CLI only prints a URL or a device code). Each test runs the CLI as a user does.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from .conftest import AuthServer, Cli, TargetFactory, open_in_browser, start_authserver
from .target import ProtectedTarget

pytestmark = pytest.mark.timeout(120)

SECRET_KEYS = ("access_token", "refresh_token", "client_secret")


def assert_no_secrets(signin: dict[str, Any], *texts: str) -> None:
    for key in SECRET_KEYS:
        value = signin.get(key)
        if value:
            for text in texts:
                assert value not in text, f"{key} leaked"


async def call_target(url: str, token: str) -> int:
    """Status of an authenticated MCP `initialize` straight to the target."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"}}}
    async with aiohttp.ClientSession() as session, session.post(
            url, json=body, headers={"Authorization": f"Bearer {token}",
                                     "Accept": "application/json, text/event-stream"}) as r:
        return r.status


async def test_dcr_login_end_to_end(cli: Cli, authserver: AuthServer,
                                    target: ProtectedTarget) -> None:
    """`login --target-url` discovers the server, registers, signs in through the browser
    and stores a sign-in whose token the target accepts; stdout is one line."""
    result = await cli.login("--target-url", target.url, "--name", "work")

    assert result.code == 0, result.stderr
    assert result.stdout == f"{authserver.issuer} work mcp:read\n"
    assert "/oidc/auth?" in result.stderr  # the URL is shown in case no browser opens
    path = cli.signin_file("work")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    signin = cli.signin("work")
    assert signin["target_url"] == target.url
    assert signin["resource"] == target.url
    assert signin["issuer"] == authserver.issuer
    assert signin["token_endpoint"] == authserver.url("/token")
    assert signin["scope"] == "mcp:read"
    assert signin["refresh_token"] and signin["expires_at"].endswith("Z")
    assert "client_secret" not in signin  # DCR registered a public client
    assert await call_target(target.url, signin["access_token"]) == 200
    assert_no_secrets(signin, result.stdout, result.stderr,
                      cli.browser_log.read_text())
    steps = [s.get("form") for s in cli.browser_steps() if s["step"] == "submit"]
    assert steps == ["login", "consent"]


async def test_registration_is_stored_and_reused(cli: Cli, target: ProtectedTarget) -> None:
    """A second sign-in to the same issuer reuses the registered client instead of
    registering another."""
    first = await cli.login("--target-url", target.url, "--name", "one")
    assert first.code == 0, first.stderr
    registrations = list((cli.state_dir / "credentials" / "clients").glob("*.json"))
    assert len(registrations) == 1
    registered = json.loads(registrations[0].read_text())
    assert registered["redirect_uris"][0].startswith("http://127.0.0.1:")
    assert "authorization_code" in registered["grant_types"]

    second = await cli.login("--target-url", target.url, "--name", "two")

    assert second.code == 0, second.stderr
    assert cli.signin("two")["client_id"] == cli.signin("one")["client_id"]
    assert list((cli.state_dir / "credentials" / "clients").glob("*.json")) == registrations


async def test_no_browser_prints_the_url_and_waits(cli: Cli, target: ProtectedTarget) -> None:
    """`--no-browser` opens nothing: the URL goes to stderr, and pasting it into a browser
    finishes the sign-in."""
    async with cli.started("login", "--target-url", target.url, "--name", "paste",
                           "--no-browser", "--timeout", "60") as running:
        await running.stderr_line("open this URL")
        url = await running.stderr_line("/oidc/auth?")
        assert cli.browser_steps() == []  # $BROWSER was not started
        assert await open_in_browser(url.strip()) == 0
        result = await running.finish()

    assert result.code == 0, result.stderr
    assert result.stdout.endswith(" paste mcp:read\n")
    assert cli.signin("paste")["resource"] == target.url


async def test_device_flow(cli: Cli, target: ProtectedTarget) -> None:
    """`--device` shows a code on stderr; once the person confirms it elsewhere the sign-in
    is stored, with its own refresh token."""
    async with cli.started("login", "--target-url", target.url, "--name", "tv",
                           "--device", "--timeout", "60") as running:
        line = await running.stderr_line("enter the code")
        assert re.search(r"enter the code [A-Z]{4}-[A-Z]{4}", line)
        complete = await running.stderr_line("(or open ")
        url = complete.split("(or open ", 1)[1].rstrip(")")
        assert await open_in_browser(url, "--device") == 0
        result = await running.finish()

    assert result.code == 0, result.stderr
    signin = cli.signin("tv")
    assert signin["refresh_token"]
    assert await call_target(target.url, signin["access_token"]) == 200
    assert_no_secrets(signin, result.stdout, result.stderr)


async def test_discovery_without_resource_metadata(cli: Cli, authserver: AuthServer,
                                                   make_target: TargetFactory) -> None:
    """A target whose 401 names no `resource_metadata` is found through the well-known
    URL at its origin."""
    quiet = await make_target(authserver, advertise_metadata=False)

    result = await cli.login("--target-url", quiet.url, "--name", "quiet")

    assert result.code == 0, result.stderr
    assert cli.signin("quiet")["issuer"] == authserver.issuer


async def test_wrong_state_gets_400_and_the_sign_in_goes_on(cli: Cli,
                                                            target: ProtectedTarget) -> None:
    """An answer with a wrong `state` is refused with 400 and the listener keeps waiting
    for the real one: another local process cannot abort the sign-in."""
    result = await cli.login("--target-url", target.url, "--name", "w",
                             mode="wrong-state-then-consent")

    assert result.code == 0, result.stderr
    callbacks = [s for s in cli.browser_steps() if s["step"] == "callback"]
    assert [(c["state"], c["status"]) for c in callbacks] == [("tampered", 400),
                                                                ("real", 200)]


# --- refusals: one line naming the step and the code, exit 1, nothing written -----------


MetadataFront = Callable[..., Awaitable[str]]


@pytest.fixture
async def metadata_front(aiohttp_server: AiohttpServer, authserver: AuthServer) -> MetadataFront:
    """An authorization-server metadata document at another URL, edited by the test."""

    async def make(edit: Callable[[dict[str, Any], str], dict[str, Any]]) -> str:
        async with aiohttp.ClientSession() as session, session.get(
                authserver.url("/.well-known/openid-configuration")) as response:
            real = await response.json()
        holder: dict[str, str] = {}

        async def serve(request: web.Request) -> web.Response:
            return web.json_response(edit(dict(real), holder["issuer"]))

        app = web.Application()
        app.router.add_get("/.well-known/oauth-authorization-server/as", serve)
        server: TestServer = await aiohttp_server(app, host="127.0.0.1")
        holder["issuer"] = str(server.make_url("/as"))
        return holder["issuer"]

    return make


def _without_s256(doc: dict[str, Any], issuer: str) -> dict[str, Any]:
    doc["issuer"] = issuer
    doc.pop("code_challenge_methods_supported")
    return doc


def _as_is(doc: dict[str, Any], issuer: str) -> dict[str, Any]:
    return doc  # still names the real issuer: not the one the resource pointed to


@pytest.mark.parametrize(("case", "step", "code"), [
    ("consent denied", "authorization", "access_denied"),
    ("state tampered", "authorization", "state"),
    ("resource mismatch", "discovery", "resource_mismatch"),
    ("issuer mismatch", "authorization server metadata", "issuer_mismatch"),
    ("no S256", "authorization server metadata", "pkce_unsupported"),
])
async def test_refusals_write_nothing(cli: Cli, authserver: AuthServer,
                                      make_target: TargetFactory,
                                      metadata_front: MetadataFront,
                                      case: str, step: str, code: str) -> None:
    """Each refusal ends `login` with exit 1 and one line naming the step and the error
    code, and leaves no sign-in and no registration behind."""
    mode, timeout, knobs = "consent", "60", {}
    if case == "consent denied":
        mode = "deny"
    elif case == "state tampered":
        mode, timeout = "wrong-state", "4"
    elif case == "resource mismatch":
        knobs = {"claimed_resource": "http://127.0.0.1:9/elsewhere"}
    elif case == "issuer mismatch":
        knobs = {"issuer_override": await metadata_front(_as_is)}
    else:
        knobs = {"issuer_override": await metadata_front(_without_s256)}
    protected = await make_target(authserver, **knobs)

    result = await cli.login("--target-url", protected.url, "--name", "r",
                             "--timeout", timeout, mode=mode)

    assert result.code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mcp-authproxy: error: login: {step}: "), result.stderr
    assert last.endswith(f"({code})"), last
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert cli.credential_files() == []


@pytest.mark.parametrize("args", [
    ("login",),
    ("login", "--target-url", "ftp://example.com/mcp"),
    ("login", "no such name!"),
    ("login", "--target-url", "http://127.0.0.1:9/mcp", "--timeout", "0"),
    ("login", "unknown-workload"),
    ("login", "--target-url", "http://127.0.0.1:9/mcp", "--client-metadata-url",
     "http://client.example/doc.json"),
    ("login", "--target-url", "http://127.0.0.1:9/mcp", "--client-secret-file", "/x"),
])
async def test_bad_flags_exit_2_with_one_line(cli: Cli, args: tuple[str, ...]) -> None:
    """Bad flags or an unknown workload: exit 2, one line naming the flag, no traceback."""
    result = await cli.run(*args)

    assert result.code == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""


async def test_login_name_refuses_an_unsafe_credentials_file(cli: Cli,
                                                             target: ProtectedTarget) -> None:
    """A credentials file with a loose mode is refused with one line, never used."""
    assert (await cli.login("--target-url", target.url, "--name", "loose")).code == 0
    os.chmod(cli.signin_file("loose"), 0o644)

    result = await cli.login("loose")

    assert result.code == 2
    assert "mode 0644" in result.stderr and "0600" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_browser_script_is_executable() -> None:
    """`$BROWSER` is started as a program, so the script must be executable."""
    assert os.access(Path(__file__).parent / "browser.py", os.X_OK)


async def test_preregistered_client_with_secret(cli: Cli, tmp_path: Path,
                                                target: ProtectedTarget) -> None:
    """`--client-id` with `--client-secret-file` signs in as that client (no registration);
    the secret is kept in the 0600 sign-in for refreshing, and printed nowhere."""
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("preregistered-secret\n")
    secret_file.chmod(0o600)

    result = await cli.login("--target-url", target.url, "--name", "pre", "--client-id",
                             "preregistered", "--client-secret-file", str(secret_file))

    assert result.code == 0, result.stderr
    signin = cli.signin("pre")
    assert (signin["client_id"], signin["client_secret"]) == ("preregistered",
                                                              "preregistered-secret")
    assert not (cli.state_dir / "credentials" / "clients").exists()
    assert "preregistered-secret" not in result.stdout + result.stderr
    assert await call_target(target.url, signin["access_token"]) == 200


async def test_callback_port_is_the_redirect_port(cli: Cli, target: ProtectedTarget) -> None:
    """`--callback-port N` puts the loopback listener, and the redirect URI, on port N."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with cli.started("login", "--target-url", target.url, "--name", "fixed",
                           "--no-browser", "--timeout", "2", "--callback-port",
                           str(port)) as running:
        url = await running.stderr_line("/oidc/auth?")
        result = await running.finish()

    assert f"redirect_uri=http://127.0.0.1:{port}/callback" in url
    assert result.code == 1


async def test_client_id_metadata_document_end_to_end(
        cli: Cli, tmp_path: Path, aiohttp_server: AiohttpServer,
        make_target: TargetFactory) -> None:
    """A Client ID Metadata Document served over https: the server fetches it, the person
    consents, and the sign-in is stored for that client, with nothing registered."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    documents: list[str] = []

    async def document(request: web.Request) -> web.Response:
        documents.append(request.path)
        return web.json_response({
            "client_id": str(request.url), "client_name": "mcp-authproxy (test)",
            "redirect_uris": ["http://127.0.0.1/callback"],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"], "token_endpoint_auth_method": "none",
            "application_type": "native"})

    app = web.Application()
    app.router.add_get("/mcp-authproxy.json", document)
    server: TestServer = await aiohttp_server(app, host="127.0.0.1", ssl=context)
    document_url = f"https://127.0.0.1:{server.port}/mcp-authproxy.json"
    authserver = start_authserver(tmp_path / "cimd-as.log", NODE_EXTRA_CA_CERTS=str(ca_file))
    try:
        target = await make_target(authserver)
        result = await cli.login("--target-url", target.url, "--name", "cimd",
                                 "--client-metadata-url", document_url)
    finally:
        authserver.stop()

    assert result.code == 0, result.stderr
    assert cli.signin("cimd")["client_id"] == document_url
    assert documents  # the authorization server read the document
    assert not (cli.state_dir / "credentials" / "clients").exists()
