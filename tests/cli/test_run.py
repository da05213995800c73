"""`mcp-authproxy run` as a user runs it: a real subprocess in front of a real upstream."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from .conftest import ProxyProcess, run_cli, start_proxy
from helpers import LONG_WAIT, UpstreamFactory, eventually, write_secret

RELEASE = web.AppKey("release", asyncio.Event)
ARRIVED = web.AppKey("arrived", asyncio.Event)


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/slow":
            arrived.set()
            await asyncio.wait_for(release.wait(), 20)
        return web.json_response({"path": request.path, "auth": request.headers.get(
            "Authorization")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    app[RELEASE] = release
    app[ARRIVED] = arrived
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    release.set()
    await server.close()


def _target(server: TestServer, path: str = "/mcp") -> str:
    return str(server.make_url(path))


def run_args(upstream: TestServer, state_dir: Path, *extra: str) -> list[str]:
    """`run` in front of `upstream`'s /mcp, its state in `state_dir`, no health probes."""
    return ["run", "--target-url", _target(upstream), "--state-dir", str(state_dir),
            "--health-interval", "0", *extra]


async def test_prints_exactly_one_stdout_line_with_the_client_url(
    upstream: TestServer, state_dir: Path, processes: list[ProxyProcess]
) -> None:
    """The only stdout line is the URL to give a client: proxy origin plus the target path."""
    proc = await start_proxy(["run", "--target-url", _target(upstream, "/mcp/v1"),
                              "--state-dir", str(state_dir), "--health-interval", "0"])
    processes.append(proc)
    assert proc.url.startswith("http://127.0.0.1:") and proc.url.endswith("/mcp/v1")
    async with aiohttp.ClientSession() as client, client.get(proc.url) as resp:
        assert resp.status == 200
        assert (await resp.json())["path"] == "/mcp/v1"
    assert await proc.stop() == 0
    assert proc.proc.stdout is not None
    rest = await proc.proc.stdout.read()
    assert rest == b""


async def test_sigterm_drains_an_in_flight_request_then_exits_zero(
    upstream: TestServer, state_dir: Path, processes: list[ProxyProcess]
) -> None:
    """SIGTERM while a request is in flight: the request still completes, exit code 0."""
    proc = await start_proxy(run_args(upstream, state_dir, "--name", "drain"))
    processes.append(proc)
    async with aiohttp.ClientSession() as client:
        slow = asyncio.create_task(client.get(proc.url.replace("/mcp", "/slow")))
        await asyncio.wait_for(upstream.app[ARRIVED].wait(), 10)
        proc.proc.send_signal(signal.SIGTERM)
        path = state_dir / "workloads" / "drain.json"
        # the proxy says "stopping" while it drains
        await eventually(lambda: json.loads(path.read_text())["status"] == "stopping",
                         LONG_WAIT, every=0.05)
        upstream.app[RELEASE].set()
        resp = await asyncio.wait_for(slow, 15)
        assert resp.status == 200
        resp.release()
    assert await proc.stop() == 0
    status = json.loads((state_dir / "workloads" / "drain.json").read_text())
    assert status["status"] == "stopped"


async def test_access_log_event_has_method_path_status_duration_and_bytes(
    upstream: TestServer, state_dir: Path, processes: list[ProxyProcess]
) -> None:
    """Each request is one JSON log line on stderr with its fields, and no credential."""
    token = write_secret(state_dir.parent / "token", "s3cr3t-token-value")
    proc = await start_proxy(run_args(upstream, state_dir, "--bearer-token-file", str(token)))
    processes.append(proc)
    async with aiohttp.ClientSession() as client, client.post(proc.url + "?x=1", data=b"{}",
                           headers={"Authorization": "Bearer client-own"}) as resp:
        body = await resp.json()
    assert body["auth"] == "Bearer s3cr3t-token-value"
    assert await proc.stop() == 0
    events = [json.loads(line) for line in proc.stderr_lines if line.startswith("{")]
    access = [e for e in events if e.get("event") == "request"]
    assert len(access) == 1
    event = access[0]
    assert event["method"] == "POST" and event["path"] == "/mcp" and event["status"] == 200
    assert "duration_ms" in event and event["bytes_out"] > 0
    assert "s3cr3t-token-value" not in proc.stderr and "client-own" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        ([], "--target-url"),
        (["--target-url", "ftp://x"], "--target-url"),
        (["--target-url", "http://x", "--port", "70000"], "--port"),
        (["--target-url", "http://x", "--port", "abc"], "--port"),
        (["--target-url", "http://x", "--name", "bad name"], "--name"),
        (["--target-url", "http://x", "--health-interval", "-1"], "--health-interval"),
        (["--target-url", "http://x", "--health-failures", "0"], "--health-failures"),
        (["--target-url", "http://x", "--bearer-token-env", "MCP_AUTHPROXY_TEST_UNSET"],
         "--bearer-token-env"),
        (["--target-url", "http://x", "--bearer-token-file", "/t", "--oauth-token-url",
          "http://t", "--oauth-client-id", "c"], "--oauth-token-url"),
        (["--target-url", "http://x", "--allowed-origin", "not an origin"], "--allowed-origin"),
        (["--target-url", "http://x", "--ca-file", "/nonexistent/ca.pem"], "--ca-file"),
        (["--target-url", "http://x", "--log-level", "loud"], "--log-level"),
        (["--target-url", "http://x", "--oauth-client-id", "c"], "--oauth-token-url"),
        (["--target-url", "http://x", "--on-unauthorized-exec", "'unclosed"],
         "--on-unauthorized-exec"),
        (["--target-url", "http://x", "--no-such-flag"], "--no-such-flag"),
    ],
)
async def test_bad_flags_exit_2_with_one_line_naming_the_flag(
    args: list[str], flag: str, state_dir: Path
) -> None:
    """A bad flag exits 2 with a single stderr line that names it, and no traceback."""
    code, out, err = await run_cli(["run", *args, "--state-dir", str(state_dir)],
                                   env={"MCP_AUTHPROXY_TARGET_URL": ""})
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert flag in lines[0] and "Traceback" not in err


async def test_env_var_fallback_for_target_url(
    upstream: TestServer, state_dir: Path, processes: list[ProxyProcess]
) -> None:
    """MCP_AUTHPROXY_TARGET_URL stands in for --target-url."""
    proc = await start_proxy(["run", "--state-dir", str(state_dir), "--health-interval", "0"],
                             env={"MCP_AUTHPROXY_TARGET_URL": _target(upstream)})
    processes.append(proc)
    assert proc.url.endswith("/mcp")
    assert await proc.stop() == 0


async def test_second_process_with_the_same_name_exits_2_naming_the_pid(
    upstream: TestServer, state_dir: Path, processes: list[ProxyProcess]
) -> None:
    """A second live proxy with the same name refuses to start and leaves the file alone."""
    first = await start_proxy(run_args(upstream, state_dir, "--name", "twin"))
    processes.append(first)
    path = state_dir / "workloads" / "twin.json"
    before = path.read_text()
    code, _, err = await run_cli(run_args(upstream, state_dir, "--name", "twin"))
    assert code == 2
    assert str(first.proc.pid) in err and len(err.strip().splitlines()) == 1
    assert path.read_text() == before
    assert await first.stop() == 0


async def test_on_unauthorized_exec_runs_once_with_the_event_and_warns(
    state_dir: Path, processes: list[ProxyProcess], tmp_path: Path, make_upstream: UpstreamFactory
) -> None:
    """--on-unauthorized-exec runs the command once per episode with the event JSON in
    MCP_AUTHPROXY_EVENT, and stderr has one WARN `unauthorized` naming the error code."""

    async def deny(request: web.Request) -> web.Response:
        return web.json_response({}, status=401, headers={
            "WWW-Authenticate": 'Bearer error="invalid_token", error_description="revoked"'})

    upstream = await make_upstream(deny)
    token = write_secret(tmp_path / "token", "cli-secret-token")
    out = tmp_path / "events"
    hook = (f"{sys.executable} -c \"import os; open({str(out)!r}, 'a').write("
            "os.environ['MCP_AUTHPROXY_EVENT'] + '\\n')\"")
    proc = await start_proxy(run_args(upstream, state_dir, "--name", "hook",
                                      "--bearer-token-file", str(token),
                                      "--on-unauthorized-exec", hook))
    processes.append(proc)
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.post(proc.url, json={}) as resp:
                assert resp.status == 503
    await eventually(lambda: out.exists() and out.read_text().endswith("\n"),
                     LONG_WAIT, what="the command to have run", every=0.05)
    assert await proc.stop() == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["workload"] == "hook" and event["status_code"] == 401
    assert event["error"] == "invalid_token"
    warns = [json.loads(line) for line in proc.stderr_lines if '"unauthorized"' in line]
    assert len(warns) == 1 and warns[0]["level"] == "warning"
    assert warns[0]["error"] == "invalid_token"
    assert "cli-secret-token" not in proc.stderr and "cli-secret-token" not in out.read_text()
