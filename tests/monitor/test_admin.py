"""The admin port: liveness, readiness, status JSON and a Prometheus scrape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import hdrs
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import ProxyConfig
from proxy.monitor.admin import AdminServer
from proxy.monitor.metrics import Metrics
from proxy.status.model import WorkloadStatus

TIMEOUT = aiohttp.ClientTimeout(total=5)


class State:
    """What the composition root would hand the admin server."""

    def __init__(self) -> None:
        self.ready = True
        self.record: dict[str, Any] = {"name": "demo", "status": "running", "conditions": []}


@pytest.fixture
async def admin() -> AsyncIterator[tuple[AdminServer, State, Metrics, list[Any]]]:
    state = State()
    metrics = Metrics()
    config = ProxyConfig(target_url="http://127.0.0.1:9/mcp", name="demo", admin_port=0)
    with structlog.testing.capture_logs() as logs:
        server = AdminServer(config, status=lambda: state.record, ready=lambda: state.ready,
                             metrics=metrics)
        await server.start()
    yield server, state, metrics, logs
    await server.stop()


async def _get(url: str, method: str = "GET") -> tuple[int, str, str]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, \
            session.request(method, url) as response:
        return response.status, response.headers.get(hdrs.CONTENT_TYPE, ""), await response.text()


async def test_listening_is_logged_with_the_port(
    admin: tuple[AdminServer, State, Metrics, list[Any]],
) -> None:
    """With --admin-port 0 the chosen port is announced as an admin_listening event."""
    server, _, _, logs = admin
    [event] = [e for e in logs if e["event"] == "admin_listening"]
    assert event["port"] == server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"


async def test_healthz(admin: tuple[AdminServer, State, Metrics, list[Any]]) -> None:
    """/healthz answers 200 while the process lives, even when it is not ready."""
    server, state, _, _ = admin
    state.ready = False
    status, _, body = await _get(server.url + "/healthz")
    assert status == 200 and "ok" in body
    status, _, _ = await _get(server.url + "/healthz", "HEAD")
    assert status == 200


async def test_readyz_flips(admin: tuple[AdminServer, State, Metrics, list[Any]]) -> None:
    """/readyz is 200 while the proxy accepts connections and 503 once it is stopping."""
    server, state, _, _ = admin
    assert (await _get(server.url + "/readyz"))[0] == 200
    state.ready = False
    assert (await _get(server.url + "/readyz"))[0] == 503
    state.ready = True
    assert (await _get(server.url + "/readyz"))[0] == 200


async def test_readyz_ignores_auth_state(
    admin: tuple[AdminServer, State, Metrics, list[Any]],
) -> None:
    """An unauthenticated workload is still ready: a revoked token is no reason to restart."""
    server, state, _, _ = admin
    state.record = {"name": "demo", "status": "unauthenticated"}
    assert (await _get(server.url + "/readyz"))[0] == 200


async def test_status_is_the_status_file_object(
    admin: tuple[AdminServer, State, Metrics, list[Any]],
) -> None:
    """/status returns the workload's status JSON, current at each request."""
    server, state, _, _ = admin
    status, content_type, body = await _get(server.url + "/status")
    assert status == 200 and content_type.startswith("application/json")
    assert json.loads(body) == state.record
    state.record = {"name": "demo", "status": "unhealthy", "conditions": []}
    assert json.loads((await _get(server.url + "/status"))[2])["status"] == "unhealthy"


async def test_metrics_scrape(admin: tuple[AdminServer, State, Metrics, list[Any]]) -> None:
    """/metrics serves this proxy's registry in the Prometheus text format."""
    server, _, metrics, _ = admin
    metrics.episode_opened()
    metrics.set_status(WorkloadStatus.RUNNING)
    status, content_type, body = await _get(server.url + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert samples[("mcp_authproxy_auth_episodes_total", ())] == 1
    assert samples[("mcp_authproxy_workload_status", (("status", "running"),))] == 1


async def test_metrics_status_follows_the_status_record(
    admin: tuple[AdminServer, State, Metrics, list[Any]],
) -> None:
    """The workload-status gauge shows the status the record holds at scrape time."""
    server, state, _, _ = admin
    state.record = {"name": "demo", "status": "unauthenticated"}
    body = (await _get(server.url + "/metrics"))[2]
    assert 'mcp_authproxy_workload_status{status="unauthenticated"} 1.0' in body
    assert 'mcp_authproxy_workload_status{status="running"} 0.0' in body


async def test_unknown_paths_are_404(admin: tuple[AdminServer, State, Metrics, list[Any]]) -> None:
    """The admin port serves only its own four paths."""
    server, _, _, _ = admin
    assert (await _get(server.url + "/mcp"))[0] == 404
    assert (await _get(server.url + "/metrics", "POST"))[0] == 405


async def test_stop_closes_the_port() -> None:
    """After stop() nothing listens on the admin port any more."""
    config = ProxyConfig(target_url="http://127.0.0.1:9/mcp", name="demo", admin_port=0)
    server = AdminServer(config, status=dict, ready=lambda: True, metrics=Metrics())
    await server.start()
    url = server.url
    await server.stop()
    await server.stop()  # idempotent
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get(url + "/healthz")
