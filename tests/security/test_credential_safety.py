"""The injected credential goes to the target's origin only, and never shows in any output."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from .conftest import (
    CLIENT_SECRET,
    COOKIE_SECRET,
    QUERY_SECRET,
    SECRET,
    AuthProxyFactory,
    LeakWatch,
    Recorder,
)
from .raw import exchange, parse, request
from helpers import WAIT, UpstreamFactory


def auth_headers(seen: list[Any]) -> list[str]:
    return [v for s in seen for k, v in s.headers if k.lower() == "authorization"]


@pytest.fixture
async def elsewhere(make_upstream: UpstreamFactory) -> Recorder:
    """A second server on another port: another origin that must never see the credential."""
    rec = Recorder()
    server = await make_upstream(rec.handler)
    rec.url = str(server.make_url("/"))
    return rec


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_to_another_origin_is_passed_to_the_client_without_following(
    make_upstream: UpstreamFactory, make_authproxy: AuthProxyFactory, elsewhere: Recorder,
    status: int
) -> None:
    """A target redirecting elsewhere cannot lure the proxy into sending it the token."""
    location = elsewhere.url + "steal"

    async def redirecting(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": location})

    upstream = await make_upstream(redirecting)
    proxy = await make_authproxy(str(upstream.make_url("/mcp")))
    answer = await request(proxy.port, ["Host: 127.0.0.1"], method="POST", body=b"{}")
    assert answer is not None and answer.status == status
    assert location.encode() in answer.head
    assert elsewhere.seen == []


@pytest.mark.parametrize("form", ["absolute", "authority"])
async def test_the_proxy_is_not_an_open_proxy_for_other_hosts(
    make_authproxy: AuthProxyFactory, recorder: Recorder, elsewhere: Recorder, form: str
) -> None:
    """An absolute-form or CONNECT request never reaches another host with the token."""
    proxy = await make_authproxy(recorder.url)
    other = elsewhere.url.removeprefix("http://").rstrip("/")
    if form == "absolute":
        raw = f"GET http://{other}/steal HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    else:
        raw = f"CONNECT {other} HTTP/1.1\r\nHost: {other}\r\nConnection: close\r\n\r\n"
    await exchange(proxy.port, raw.encode(), wait=WAIT)
    assert elsewhere.seen == []
    # Whatever reached the target went to the target, with the target's credential.
    assert all(v == f"Bearer {SECRET}" for v in auth_headers(recorder.seen))


async def test_client_credentials_and_proxy_headers_are_not_passed_through(
    make_authproxy: AuthProxyFactory, recorder: Recorder
) -> None:
    """With a configured credential the client's own token is replaced and proxy auth dropped."""
    proxy = await make_authproxy(recorder.url)
    answer = await request(proxy.port, [
        "Host: 127.0.0.1",
        f"Authorization: Bearer {CLIENT_SECRET}",
        f"Proxy-Authorization: Basic {CLIENT_SECRET}",
        "X-Forwarded-For: 203.0.113.9",
        "X-Forwarded-Host: evil.example",
        "Forwarded: for=203.0.113.9;host=evil.example",
    ])
    assert answer is not None and answer.status == 200
    (seen,) = recorder.seen
    names = {k.lower(): v for k, v in seen.headers}
    assert auth_headers(recorder.seen) == [f"Bearer {SECRET}"]
    assert "proxy-authorization" not in names
    assert "forwarded" not in names and "x-forwarded-host" not in names
    assert names["x-forwarded-for"] == "127.0.0.1"


async def test_proxy_authenticate_from_the_target_never_reaches_the_client(
    make_upstream: UpstreamFactory, make_authproxy: AuthProxyFactory
) -> None:
    """A target cannot make the user's client prompt for proxy credentials."""

    async def asking(request: web.Request) -> web.Response:
        return web.Response(status=407, headers={"Proxy-Authenticate": "Basic realm=x"})

    upstream = await make_upstream(asking)
    proxy = await make_authproxy(str(upstream.make_url("/mcp")))
    answer = await request(proxy.port, ["Host: 127.0.0.1"])
    assert answer is not None
    assert b"proxy-authenticate" not in answer.head.lower()


async def test_secrets_in_requests_and_the_target_url_are_redacted_everywhere(
    make_authproxy: AuthProxyFactory, recorder: Recorder, leak_watch: LeakWatch, tmp_path: Path
) -> None:
    """Tokens in headers, cookies, query strings and the target URL never reach logs or status."""
    proxy = await make_authproxy(recorder.url + f"?api_key={QUERY_SECRET}",
                                 admin_port=0)
    answer = await request(proxy.port, [
        "Host: 127.0.0.1",
        f"Authorization: Bearer {CLIENT_SECRET}",
        f"Cookie: sid={COOKIE_SECRET}",
    ], target=f"/mcp?access_token={QUERY_SECRET}&x=1")
    assert answer is not None and answer.status == 200
    # The target did get what it is owed: its own key and the injected token.
    assert QUERY_SECRET in recorder.seen[0].raw_path
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{proxy.admin_port}/status") as resp:
            status_text = await resp.text()
        async with session.get(f"http://127.0.0.1:{proxy.admin_port}/metrics") as resp:
            metrics_text = await resp.text()
    leak_watch.texts += [status_text, metrics_text, json.dumps(proxy.status.to_dict())]
    assert json.loads(status_text)["target_url"].startswith(recorder.url)
    assert any(e.get("event") == "request" for e in leak_watch.logs)


async def test_error_answers_do_not_echo_the_target_url_secret(
    make_authproxy: AuthProxyFactory, leak_watch: LeakWatch
) -> None:
    """A 502 for an unreachable target says why without repeating the target's API key."""
    proxy = await make_authproxy(f"http://127.0.0.1:9/mcp?token={QUERY_SECRET}")
    answer = await request(proxy.port, ["Host: 127.0.0.1"])
    assert answer is not None and answer.status == 502
    leak_watch.texts.append(answer.body.decode())


async def test_status_files_are_private_to_the_user(
    make_authproxy: AuthProxyFactory, recorder: Recorder, tmp_path: Path
) -> None:
    """Other local users cannot read the status directory or files."""
    old = os.umask(0o022)
    try:
        proxy = await make_authproxy(recorder.url)
    finally:
        os.umask(old)
    folder = tmp_path / "state" / "workloads"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = list(folder.iterdir())
    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    status_file = folder / f"{proxy.config.workload}.json"
    assert stat.S_IMODE(status_file.stat().st_mode) == 0o600


async def test_the_cli_keeps_every_secret_out_of_its_output(
    recorder: Recorder, token_file: Path, tmp_path: Path, leak_watch: LeakWatch
) -> None:
    """Run as a real process, neither stderr nor `status` output show a credential."""
    state = tmp_path / "state"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--target-url",
        recorder.url + f"?api_key={QUERY_SECRET}", "--bearer-token-file", str(token_file),
        "--state-dir", str(state), "--health-interval", "0", "--log-level", "debug",
        "--log-format", "json",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        answer = await request(port, ["Host: 127.0.0.1", f"Authorization: Bearer {CLIENT_SECRET}",
                                      f"Cookie: a={COOKIE_SECRET}"],
                               target=f"/mcp?refresh_token={QUERY_SECRET}")
        assert answer is not None and answer.status == 200
        status = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "status", "--state-dir", str(state), "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(status.communicate(), 20)
        leak_watch.texts += [out.decode(), err.decode()]
        table = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "status", "--state-dir", str(state),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(table.communicate(), 20)
        leak_watch.texts += [out.decode(), err.decode()]
        proc.terminate()
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0
        leak_watch.texts.append(stderr.decode())
        assert b'"request"' in stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert parse(b"") is None
