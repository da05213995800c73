"""The whole proxy, composed by `AuthProxy`, against real loopback upstreams.

These are the end-to-end paths that cross parts: a token file healing a workload
without a restart, the OAuth replay limit, health probes turning a status, and
`/metrics` counting real traffic.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy import AuthProxy, ProxyConfig, UnauthorizedEvent, WorkloadStatus

from helpers import LONG_WAIT, eventually, status_now, write_secret

UpstreamFactory = Callable[..., Awaitable[TestServer]]


class Gate:
    """An upstream that accepts exactly one bearer token and records what it saw."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.seen: list[tuple[str, str | None, int]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        auth = request.headers.get("Authorization")
        self.seen.append((request.path, auth, len(body)))
        if request.path.startswith("/.well-known/"):
            return web.json_response({"resource": "x"})
        if auth != f"Bearer {self.token}":
            return web.json_response({}, status=401, headers={
                "WWW-Authenticate": 'Bearer error="invalid_token", '
                                    'error_description="The access token expired"'})
        if request.headers.get("X-Test-Stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b"event: message\ndata: {}\n\n")
            await asyncio.sleep(30)  # held open until the client leaves
            return resp
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})


def config_for(upstream: TestServer, tmp_path: Path, name: str, **settings: Any) -> ProxyConfig:
    """The proxy's settings for `upstream`'s /mcp, its state under `tmp_path`, no health
    probes unless `settings` say otherwise."""
    settings.setdefault("health_interval", 0)
    return ProxyConfig(target_url=str(upstream.make_url("/mcp")), name=name,
                       state_dir=tmp_path / "state", **settings)


async def post(session: aiohttp.ClientSession, url: str, body: bytes = b"{}") -> int:
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        await r.read()
        return r.status


def file_status(state_dir: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((state_dir / "workloads" / f"{name}.json").read_text())
    return data


@pytest.mark.parametrize("how", ["in_place", "atomic_rename"])
async def test_rewriting_the_token_file_heals_the_workload_without_a_restart(
    tmp_path: Path, make_upstream: UpstreamFactory, how: str
) -> None:
    """A rejected token turns the workload unauthenticated; writing a fresh one (even of the
    same length) makes the next calls succeed and the status running again."""
    gate = Gate("token-AAAA")
    upstream = await make_upstream(gate.handle)
    token = write_secret(tmp_path / "token", "token-AAAA")
    events: list[UnauthorizedEvent] = []
    config = config_for(upstream, tmp_path, "heal", bearer_token_file=token)
    async with AuthProxy(config, on_unauthorized=events.append) as proxy, \
            aiohttp.ClientSession() as session:
        assert await post(session, proxy.url) == 200
        gate.token = "token-BBBB"  # the server rotated it; same length as the old one
        assert await post(session, proxy.url) == 503
        await proxy.monitor.flush()
        assert file_status(tmp_path / "state", "heal")["status"] == "unauthenticated"
        if how == "in_place":
            fd = os.open(token, os.O_WRONLY)  # same inode, same length: only the bytes change
            try:
                os.write(fd, b"token-BBBB\n")
            finally:
                os.close(fd)
        else:
            write_secret(tmp_path / "token.new", "token-BBBB")
            os.replace(tmp_path / "token.new", token)
        statuses = [await post(session, proxy.url) for _ in range(2)]
        assert statuses[-1] == 200  # at most the first call still carried the old token
        await proxy.monitor.flush()
        assert proxy.status.status is WorkloadStatus.RUNNING
        assert file_status(tmp_path / "state", "heal")["status"] == "running"
    assert len(events) == 1


async def test_missing_token_file_at_start_gives_503_until_it_appears(
    tmp_path: Path, make_upstream: UpstreamFactory
) -> None:
    """A proxy started before its token file exists runs, says unauthenticated, answers
    503 with Retry-After (never a made-up 401), and heals when the file appears."""
    gate = Gate("late-token")
    upstream = await make_upstream(gate.handle)
    token = tmp_path / "token"
    events: list[UnauthorizedEvent] = []
    config = config_for(upstream, tmp_path, "late", bearer_token_file=token)
    async with AuthProxy(config, on_unauthorized=events.append) as proxy, \
            aiohttp.ClientSession() as session:
        await proxy.monitor.flush()
        record = file_status(tmp_path / "state", "late")
        assert record["status"] == "unauthenticated"
        assert record["reason"] == "TokenFileMissing" and str(token) in record["message"]
        async with session.post(proxy.url, json={}) as resp:
            assert resp.status == 503 and "Retry-After" in resp.headers
        assert gate.seen == []  # nothing reached the target without a credential
        assert len(events) == 1 and events[0].status_code is None
        write_secret(token, "late-token")
        await eventually(lambda: proxy.status.status is not WorkloadStatus.UNAUTHENTICATED
                         or proxy.monitor.episode_open, LONG_WAIT, what="the file watcher")

        async def served() -> bool:
            return await post(session, proxy.url) == 200

        # the watcher checks the file every second
        await eventually(served, LONG_WAIT, what="a call to succeed", every=0.05)
        await proxy.monitor.flush()
        assert proxy.status.status is WorkloadStatus.RUNNING


async def test_oauth_body_over_replay_limit_is_not_replayed_and_gets_the_503(
    tmp_path: Path, make_upstream: UpstreamFactory
) -> None:
    """With OAuth, a small request is refreshed and replayed invisibly, but one whose body
    exceeded replay_limit gets the 503 for the target's 401; the refresh it caused
    makes the next call work, and no false episode opens for the replaced token."""
    issued: list[str] = []

    async def token_endpoint(request: web.Request) -> web.Response:
        issued.append(f"tok-{len(issued) + 1}")
        return web.json_response({"access_token": issued[-1], "token_type": "Bearer",
                                  "expires_in": 3600})

    endpoint = await make_upstream(token_endpoint)
    gate = Gate("tok-1")
    upstream = await make_upstream(gate.handle)
    config = config_for(upstream, tmp_path, "oauth",
                        oauth_token_url=str(endpoint.make_url("/token")),
                        oauth_client_id="client",
                        oauth_client_secret_file=write_secret(tmp_path / "secret", "shh"),
                        replay_limit=1024)
    async with AuthProxy(config) as proxy, aiohttp.ClientSession() as session:
        assert await post(session, proxy.url) == 200
        gate.token = "tok-2"  # the target stops accepting tok-1
        assert await post(session, proxy.url) == 200  # refreshed to tok-2 and replayed
        gate.token = "tok-3"
        big = b"[" + b" " * 4096 + b"]"
        assert await post(session, proxy.url, big) == 503  # not kept, so not replayed
        assert [len_ for path, auth, len_ in gate.seen if auth == "Bearer tok-2"][-1] == len(big)
        assert [auth for _, auth, _ in gate.seen].count("Bearer tok-3") == 0
        # The refresh it triggered already made tok-3 current: the next call proves it.
        assert await post(session, proxy.url) == 200
        await proxy.monitor.flush()
        assert proxy.status.status is WorkloadStatus.RUNNING
        assert not proxy.monitor.episode_open
    assert issued == ["tok-1", "tok-2", "tok-3"]


async def test_probes_answered_401_make_the_workload_unauthenticated_not_unhealthy(
    tmp_path: Path, make_upstream: UpstreamFactory
) -> None:
    """With a credential configured, a target answering every probe 401 is unauthenticated
    (one callback) and never unhealthy; probes answered 400 prove nothing."""
    answers = {"status": 401}
    answered_400: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        if answers["status"] == 400:
            answered_400.append(1)
        return web.json_response({}, status=answers["status"], headers={
            "WWW-Authenticate": 'Bearer error="invalid_token"'} if answers["status"] == 401
            else {})

    upstream = await make_upstream(handler)
    events: list[UnauthorizedEvent] = []
    config = config_for(upstream, tmp_path, "probe401",
                        bearer_token_file=write_secret(tmp_path / "token", "t"),
                        health_interval=0.02, health_timeout=1, health_failures=1)
    async with AuthProxy(config, on_unauthorized=events.append) as proxy:
        await eventually(lambda: proxy.status.status is WorkloadStatus.UNAUTHENTICATED,
                         LONG_WAIT, what="401")
        answers["status"] = 400  # a "missing session" answer: reachable, but no proof
        await eventually(lambda: len(answered_400) >= 5,
                         LONG_WAIT, what="five probes answered 400")
        assert proxy.status.status is WorkloadStatus.UNAUTHENTICATED
        answers["status"] = 200
        await eventually(lambda: status_now(proxy) is WorkloadStatus.RUNNING,
                         LONG_WAIT, what="proof by probe")
    assert len(events) == 1


async def test_metrics_count_real_traffic_streams_and_the_status(
    tmp_path: Path, make_upstream: UpstreamFactory
) -> None:
    """/metrics on the admin port counts the requests sent, their upstream latencies, the
    open SSE stream while it is held, and follows the workload through an episode."""
    gate = Gate("good")
    upstream = await make_upstream(gate.handle)
    config = config_for(upstream, tmp_path, "metrics",
                        bearer_token_file=write_secret(tmp_path / "token", "good"),
                        admin_port=0)

    async def scrape(session: aiohttp.ClientSession, port: int) -> dict[str, float]:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = sample.name + json.dumps(sample.labels, sort_keys=True)
                values[key] = sample.value
        return values

    def total(values: dict[str, float], prefix: str, **labels: str) -> float:
        return sum(v for k, v in values.items() if k.startswith(prefix + "{") and all(
            f'"{lk}": "{lv}"' in k for lk, lv in labels.items()))

    async with AuthProxy(config) as proxy, aiohttp.ClientSession() as session:
        assert proxy.admin_port
        for _ in range(7):
            assert await post(session, proxy.url) == 200
        values = await scrape(session, proxy.admin_port)
        assert total(values, "mcp_authproxy_requests_total", method="POST", code="2xx") == 7
        assert total(values, "mcp_authproxy_upstream_response_seconds_count") == 7
        buckets = [v for k, v in values.items()
                   if k.startswith("mcp_authproxy_upstream_response_seconds_bucket{")]
        assert len(buckets) == 16 and buckets == sorted(buckets) and buckets[-1] == 7
        assert total(values, "mcp_authproxy_upstream_response_seconds_sum") > 0
        assert total(values, "mcp_authproxy_workload_status", status="running") == 1

        resp = await session.post(proxy.url, json={}, headers={"X-Test-Stream": "1"})
        assert (await resp.content.readline()).startswith(b"event: message")
        values = await scrape(session, proxy.admin_port)
        assert total(values, "mcp_authproxy_open_streams") == 1
        resp.close()
        await eventually(lambda: proxy._server.in_flight == 0,
                         LONG_WAIT, what="the stream to end")
        values = await scrape(session, proxy.admin_port)
        assert total(values, "mcp_authproxy_open_streams") == 0

        gate.token = "other"
        assert await post(session, proxy.url) == 503
        await proxy.monitor.flush()
        values = await scrape(session, proxy.admin_port)
        assert total(values, "mcp_authproxy_workload_status", status="unauthenticated") == 1
        assert total(values, "mcp_authproxy_auth_episodes_total") == 1
