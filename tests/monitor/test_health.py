"""Health probes: the classifier's table and the probe loop against a real upstream."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import hdrs, web
from pytest_aiohttp import AiohttpServer

from proxy.config import ProxyConfig
from proxy.credentials.base import Credential, CredentialReporter
from proxy.errors import CredentialInvalid
from proxy.forwarding.observe import Exchange
from proxy.monitor.health import (
    PROBE_BODY,
    HealthProber,
    ProbeOutcome,
    ProbeResult,
    classify_probe,
)
from proxy.status.model import ConditionType, Serving, Started, WorkloadStatus

from helpers import WAIT

TOKEN = "s3cr3t-probe-token"


# --- the classifier ----------------------------------------------------------------

def _conn_error(exc_type: type[aiohttp.ClientConnectorError]) -> BaseException:
    key = SimpleNamespace(host="127.0.0.1", port=1, ssl=False)
    # a stand-in for the ConnectionKey aiohttp builds (it does not export the class)
    return exc_type(key, ConnectionRefusedError(111, "refused"))  # type: ignore[arg-type]


BEARER_401: dict[str, str] = {
    hdrs.WWW_AUTHENTICATE: 'Bearer error="invalid_token", error_description="x"'
}
SCOPE_403: dict[str, str] = {
    hdrs.WWW_AUTHENTICATE: 'Bearer error="insufficient_scope", scope="tools"'
}

# status, headers, error, credential sent -> outcome, counts as failed, handed to observer
TABLE: list[tuple[int | None, dict[str, str] | None, BaseException | None, bool,
                  ProbeOutcome, bool, bool]] = [
    (200, {}, None, True, ProbeOutcome.REACHABLE, False, True),
    (200, {}, None, False, ProbeOutcome.REACHABLE, False, True),
    (202, {}, None, True, ProbeOutcome.REACHABLE, False, True),
    (307, {hdrs.LOCATION: "/elsewhere"}, None, True, ProbeOutcome.REACHABLE, False, True),
    (400, {}, None, True, ProbeOutcome.REACHABLE, False, True),  # "missing session"
    (400, {}, None, False, ProbeOutcome.REACHABLE, False, True),
    (401, BEARER_401, None, True, ProbeOutcome.UNAUTHORIZED, False, True),
    (401, {}, None, True, ProbeOutcome.UNAUTHORIZED, False, True),
    (401, BEARER_401, None, False, ProbeOutcome.REACHABLE, False, False),
    (401, {}, None, False, ProbeOutcome.REACHABLE, False, False),
    (403, SCOPE_403, None, True, ProbeOutcome.REACHABLE, False, True),
    (403, SCOPE_403, None, False, ProbeOutcome.REACHABLE, False, True),
    (404, {}, None, True, ProbeOutcome.REACHABLE, False, True),
    (405, {}, None, False, ProbeOutcome.REACHABLE, False, True),
    (429, {}, None, True, ProbeOutcome.REACHABLE, False, True),
    (499, {}, None, True, ProbeOutcome.REACHABLE, False, True),
    (500, {}, None, True, ProbeOutcome.SERVER_ERROR, True, True),
    (502, {}, None, False, ProbeOutcome.SERVER_ERROR, True, True),
    (503, {}, None, True, ProbeOutcome.SERVER_ERROR, True, True),
    (599, {}, None, True, ProbeOutcome.SERVER_ERROR, True, True),
    (None, None, TimeoutError(), True, ProbeOutcome.TIMEOUT, True, False),
    (None, None, aiohttp.ServerTimeoutError("read"), False, ProbeOutcome.TIMEOUT, True, False),
    (None, None, aiohttp.ConnectionTimeoutError(), True, ProbeOutcome.TIMEOUT, True, False),
    (None, None, _conn_error(aiohttp.ClientConnectorError), True,
     ProbeOutcome.UNREACHABLE, True, False),
    (None, None, ConnectionRefusedError(111, "refused"), False,
     ProbeOutcome.UNREACHABLE, True, False),
    (None, None, aiohttp.ServerDisconnectedError(), True, ProbeOutcome.UNREACHABLE, True, False),
    (None, None, ConnectionResetError(104, "reset"), True, ProbeOutcome.UNREACHABLE, True, False),
    (None, None, aiohttp.ClientOSError(104, "reset"), True, ProbeOutcome.UNREACHABLE, True, False),
    (None, None, ssl.SSLError(1, "bad cert"), True, ProbeOutcome.UNREACHABLE, True, False),
    (None, None, _conn_error(aiohttp.ClientConnectorDNSError), True,
     ProbeOutcome.UNREACHABLE, True, False),
    (None, None, aiohttp.ClientPayloadError("bad"), True, ProbeOutcome.UNREACHABLE, True, False),
]


@pytest.mark.parametrize(
    ("status", "headers", "error", "sent", "outcome", "failed", "notify"), TABLE
)
def test_classify_probe_table(
    status: int | None, headers: dict[str, str] | None, error: BaseException | None,
    sent: bool, outcome: ProbeOutcome, failed: bool, notify: bool,
) -> None:
    """Every answer shape counts as reachable or failed as the contract's Reachable row says."""
    result = classify_probe(status, headers, error, credentials_configured=sent)
    assert (result.outcome, result.failed, result.notify) == (outcome, failed, notify)
    assert result.status == status
    assert result.detail and "\n" not in result.detail


def test_classify_names_the_bearer_error() -> None:
    """A person reading the probe detail sees the target's RFC 6750 error code."""
    result = classify_probe(403, SCOPE_403, None, credentials_configured=True)
    assert "insufficient_scope" in result.detail
    tls = classify_probe(None, None, ssl.SSLError(1, "x"), credentials_configured=True)
    assert "TLS" in tls.detail


# --- fakes for the collaborators ----------------------------------------------------

@dataclass
class Sink:
    """Records condition changes; an event per Reachable value so tests can wait on them."""

    calls: list[tuple[ConditionType, bool, str, str]] = field(default_factory=list)
    became: dict[bool, asyncio.Event] = field(
        default_factory=lambda: {True: asyncio.Event(), False: asyncio.Event()}
    )

    def set_condition(self, kind: ConditionType, status: bool, reason: str, message: str) -> None:
        self.calls.append((kind, status, reason, message))
        if kind is ConditionType.REACHABLE:
            self.became[not status].clear()
            self.became[status].set()

    def reachable_calls(self) -> list[bool]:
        return [status for kind, status, _, _ in self.calls if kind is ConditionType.REACHABLE]


@dataclass
class Observer:
    exchanges: list[Exchange] = field(default_factory=list)

    def on_response(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)

    def on_complete(self, exchange: Exchange, duration: float, bytes_out: int) -> None:
        raise AssertionError("probes have no client response to complete")


@dataclass
class Recorder:
    """Counts probes; `wait_for(n)` returns once n probes have been recorded."""

    results: list[ProbeResult] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def probe(self, result: ProbeResult) -> None:
        self.results.append(result)
        self.changed.set()

    async def wait_for(self, n: int, pred: Callable[[ProbeResult], bool] = lambda r: True) -> None:
        async def until() -> None:
            while sum(1 for r in self.results if pred(r)) < n:
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(until(), WAIT)


class Credentials:
    """A fixed bearer token, or none at hand when `token` is None."""

    description = "test token"
    fix = "replace the test token"
    can_refresh = False

    def __init__(self, token: str | None = TOKEN) -> None:
        self.token = token

    @property
    def current_version(self) -> int | None:
        return 1 if self.token else None

    async def start(self, report: CredentialReporter) -> None:
        return None

    async def close(self) -> None:
        return None

    def ready(self) -> Credential | None:
        return Credential(f"Bearer {self.token}", 1) if self.token else None

    async def get(self) -> Credential:
        if self.token is None:
            raise CredentialInvalid("TokenFileMissing", "token file /x is missing")
        return Credential(f"Bearer {self.token}", 1)

    async def after_unauthorized(self, used: Credential) -> Credential | None:
        return None


class Upstream:
    """A real loopback MCP-ish server that can be stopped and started on the same port."""

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None,
                 answer: Callable[[web.Request], Awaitable[web.Response]] | None = None) -> None:
        """`answer`: a handler to serve instead of the recording MCP-ish one."""
        self.status = status
        self._answer = answer
        self.headers = headers or {}
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.method, request.path_qs, dict(request.headers), body))
        return web.json_response({"jsonrpc": "2.0", "id": "mcp-authproxy-health", "result": {}},
                                 status=self.status, headers=self.headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer or self.handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _config(port: int, **kw: Any) -> ProxyConfig:
    defaults: dict[str, Any] = {"health_interval": 0.05, "health_timeout": 0.5,
                                "health_failures": 3}
    return ProxyConfig(target_url=f"http://127.0.0.1:{port}/mcp?tenant=a", name="probe-test",
                       **(defaults | kw))


@dataclass
class Rig:
    prober: HealthProber
    sink: Sink
    observer: Observer
    recorder: Recorder


@pytest.fixture
async def make_rig(session: aiohttp.ClientSession) -> AsyncIterator[Callable[..., Rig]]:
    made: list[HealthProber] = []

    def make(config: ProxyConfig, credentials: Credentials | None = None) -> Rig:
        sink, observer, recorder = Sink(), Observer(), Recorder()
        prober = HealthProber(config, session=session, credentials=credentials,
                              conditions=sink, observer=observer, metrics=recorder)
        made.append(prober)
        return Rig(prober, sink, observer, recorder)

    yield make
    for prober in made:
        await prober.stop()


# --- the probe loop against a real upstream -----------------------------------------

async def test_probe_request_shape(upstream: Upstream, make_rig: Callable[..., Rig]) -> None:
    """The target sees an MCP `initialize` for a credential not yet checked, then JSON-RPC
    pings, POSTed to its MCP URL with the query and credential."""
    rig = make_rig(_config(upstream.port), Credentials())
    await rig.prober.probe_once()
    assert json.loads(upstream.requests[0][3])["method"] == "initialize"
    rig.observer.exchanges.clear()
    result = await rig.prober.probe_once()
    assert result.outcome is ProbeOutcome.REACHABLE
    method, path_qs, headers, body = upstream.requests[1]
    assert (method, path_qs) == ("POST", "/mcp?tenant=a")
    assert json.loads(body) == {"jsonrpc": "2.0", "id": "mcp-authproxy-health", "method": "ping"}
    assert body == PROBE_BODY
    assert headers[hdrs.AUTHORIZATION] == f"Bearer {TOKEN}"
    assert headers[hdrs.ACCEPT] == "application/json, text/event-stream"
    assert headers[hdrs.CONTENT_TYPE] == "application/json"
    [exchange] = rig.observer.exchanges
    assert (exchange.probe, exchange.on_mcp_path, exchange.status) == (True, True, 200)
    assert exchange.path == "/mcp" and exchange.method == "POST"
    assert exchange.credential is not None and exchange.credential.version == 1


async def test_unreachable_then_reachable_again(
    upstream: Upstream, make_rig: Callable[..., Rig]
) -> None:
    """A target that goes down turns Reachable False with one WARN, and True once it is back."""
    config = _config(upstream.port)
    with structlog.testing.capture_logs() as logs:
        rig = make_rig(config, Credentials())
        await rig.prober.start()
        await asyncio.wait_for(rig.sink.became[True].wait(), WAIT)
        await upstream.stop()
        down_by = config.health_interval * config.health_failures + config.health_timeout + 2.0
        await asyncio.wait_for(rig.sink.became[False].wait(), down_by)
        failed_so_far = sum(1 for r in rig.recorder.results if r.failed)
        # A few more failed probes while down: none of them may warn again.
        await rig.recorder.wait_for(failed_so_far + 3, lambda r: r.failed)
        await upstream.start()
        await asyncio.wait_for(rig.sink.became[True].wait(), WAIT)
        await rig.prober.stop()

    assert rig.sink.reachable_calls() == [True, False, True]
    _, _, reason, message = rig.sink.calls[1]
    assert reason == "ProbeFailed" and "3 consecutive health probes" in message
    assert message.endswith(".") and "refused" in message
    assert rig.sink.calls[2][2] == "ProbeSucceeded"
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["target_unreachable"]
    assert [e["event"] for e in logs if e["log_level"] == "info"] == ["target_reachable"]
    assert sum(1 for e in logs if e["event"] == "health_probe_failed") >= 6
    assert TOKEN not in repr(logs) and TOKEN not in repr(rig.sink.calls)


async def test_server_errors_count_as_failures(
    upstream: Upstream, make_rig: Callable[..., Rig]
) -> None:
    """A target answering 503 to every probe turns unhealthy, and the observer still sees it."""
    upstream.status = 503
    rig = make_rig(_config(upstream.port, health_failures=2), Credentials())
    await rig.prober.start()
    await asyncio.wait_for(rig.sink.became[False].wait(), WAIT)
    assert rig.sink.reachable_calls() == [False]
    assert "503" in rig.sink.calls[0][3]
    assert all(e.status == 503 and e.probe for e in rig.observer.exchanges)


async def test_401_with_credential_opens_episode_not_unhealthy(
    upstream: Upstream, make_rig: Callable[..., Rig]
) -> None:
    """Probes answered 401 reach the auth monitor as credentialed probes; never unhealthy."""
    upstream.status = 401
    upstream.headers = {hdrs.WWW_AUTHENTICATE: 'Bearer error="invalid_token"'}
    rig = make_rig(_config(upstream.port, health_failures=1), Credentials())
    await rig.prober.start()
    await rig.recorder.wait_for(5)
    assert {r.outcome for r in rig.recorder.results} == {ProbeOutcome.UNAUTHORIZED}
    assert len(rig.observer.exchanges) >= 5
    for exchange in rig.observer.exchanges:
        assert (exchange.status, exchange.probe, exchange.on_mcp_path) == (401, True, True)
        assert exchange.credential is not None
        assert exchange.upstream_headers is not None
        assert "invalid_token" in exchange.upstream_headers[hdrs.WWW_AUTHENTICATE]
    assert False not in rig.sink.reachable_calls()
    assert rig.prober.consecutive_failures == 0


async def test_401_without_credential_source_is_reachable(
    upstream: Upstream, make_rig: Callable[..., Rig]
) -> None:
    """With no credential source, a 401 probe shows the target is up and opens nothing."""
    upstream.status = 401
    rig = make_rig(_config(upstream.port, health_failures=1), None)
    await rig.prober.start()
    await rig.recorder.wait_for(3)
    assert rig.sink.reachable_calls() == [True]
    assert rig.observer.exchanges == []
    assert all(hdrs.AUTHORIZATION not in h for _, _, h, _ in upstream.requests)


async def test_credential_unavailable_probes_without_it(
    upstream: Upstream, make_rig: Callable[..., Rig]
) -> None:
    """A source with no credential at hand still gets reachability checked, proving nothing."""
    rig = make_rig(_config(upstream.port), Credentials(token=None))
    upstream.status = 401
    assert (await rig.prober.probe_once()).outcome is ProbeOutcome.REACHABLE
    upstream.status = 200
    assert (await rig.prober.probe_once()).outcome is ProbeOutcome.REACHABLE
    assert all(hdrs.AUTHORIZATION not in h for _, _, h, _ in upstream.requests)
    # Neither answer can open or close an episode: the monitor never hears of them.
    assert rig.observer.exchanges == []
    assert rig.sink.reachable_calls() == [True]


async def test_probes_never_overlap(make_rig: Callable[..., Rig]) -> None:
    """A slow target never gets a second probe while the first is still unanswered."""
    active = 0
    most = 0
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        nonlocal active, most
        active += 1
        most = max(most, active)
        arrived.set()
        await release.wait()
        active -= 1
        return web.Response(status=204)

    up = Upstream(answer=slow)
    await up.start()
    try:
        rig = make_rig(_config(up.port, health_timeout=WAIT))
        both = asyncio.gather(rig.prober.probe_once(), rig.prober.probe_once())
        await asyncio.wait_for(arrived.wait(), WAIT)
        for _ in range(50):
            await asyncio.sleep(0)  # let a second probe race in, if it could
        release.set()
        results = await asyncio.wait_for(both, WAIT)
    finally:
        await up.stop()
    assert [r.status for r in results] == [204, 204]
    assert most == 1


async def test_timeout_is_a_failure_and_stop_is_clean(make_rig: Callable[..., Rig]) -> None:
    """A target that never answers fails probes after health_timeout; stopping cancels at once."""
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    up = Upstream(answer=hang)
    await up.start()
    try:
        rig = make_rig(_config(up.port, health_timeout=0.1, health_failures=1))
        await rig.prober.start()
        await asyncio.wait_for(rig.sink.became[False].wait(), WAIT)
        assert rig.recorder.results[0].outcome is ProbeOutcome.TIMEOUT
        await asyncio.wait_for(rig.prober.stop(), WAIT)
        await rig.prober.stop()  # idempotent
    finally:
        release.set()
        await up.stop()


async def test_interval_zero_means_off(upstream: Upstream, make_rig: Callable[..., Rig]) -> None:
    """--health-interval 0 sends no probe at all."""
    rig = make_rig(_config(upstream.port, health_interval=0))
    await rig.prober.start()
    for _ in range(20):
        await asyncio.sleep(0)
    assert upstream.requests == [] and rig.sink.calls == []
    await rig.prober.stop()


async def test_observer_failure_does_not_stop_probing(
    upstream: Upstream, make_rig: Callable[..., Rig]
) -> None:
    """A bug in the auth monitor is logged, and probing carries on."""
    def broken(exchange: Exchange) -> None:
        raise RuntimeError("monitor bug")

    with structlog.testing.capture_logs() as logs:
        rig = make_rig(_config(upstream.port), Credentials())
        rig.observer.on_response = broken  # type: ignore[method-assign]  # the failing observer
        await rig.prober.start()
        await rig.recorder.wait_for(3)
    assert rig.sink.reachable_calls() == [True]
    assert any(e["event"] == "health_probe_observer_failed" for e in logs)


async def test_probe_opens_and_ends_an_episode_with_the_real_monitor(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    """A revoked token is noticed by probes alone, and a probe's 200 ends the episode again."""
    from proxy.monitor.auth import AuthMonitor, UnauthorizedEvent
    from proxy.status.store import MemoryStore
    from proxy.status.workload import Workload

    config = _config(upstream.port)
    workload = Workload(MemoryStore(config.workload))
    await workload.claim(Started(pid=1, target_url="http://127.0.0.1/mcp"))
    await workload.apply(Serving())
    events: list[UnauthorizedEvent] = []

    def on_unauthorized(event: UnauthorizedEvent) -> None:
        events.append(event)

    def status() -> WorkloadStatus:
        return workload.record.status

    monitor = AuthMonitor(workload, mcp_path=config.mcp_path, credentials_configured=True,
                          current_version=lambda: 1, on_unauthorized=on_unauthorized)
    prober = HealthProber(config, session=session, credentials=Credentials(),
                          conditions=workload, observer=monitor)
    upstream.status = 401
    upstream.headers = {hdrs.WWW_AUTHENTICATE: 'Bearer error="invalid_token"'}
    await prober.probe_once()
    await prober.probe_once()
    await monitor.flush()
    assert status() is WorkloadStatus.UNAUTHENTICATED
    assert [e.error for e in events] == ["invalid_token"]
    upstream.status, upstream.headers = 200, {}
    await prober.probe_once()
    await monitor.flush()
    assert status() is WorkloadStatus.RUNNING
    reachable = workload.record.condition(ConditionType.REACHABLE)
    assert reachable is not None and reachable.status


async def test_tls_failure_is_a_failed_probe(make_rig: Callable[..., Rig]) -> None:
    """An https target whose certificate the proxy does not trust counts as unreachable."""
    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/mcp", answer)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx).start()
    port = int(runner.addresses[0][1])
    try:
        config = ProxyConfig(target_url=f"https://127.0.0.1:{port}/mcp", name="tls",
                             health_timeout=2, health_failures=1)
        rig = make_rig(config, Credentials())
        result = await rig.prober.probe_once()
    finally:
        await runner.cleanup()
    assert (result.outcome, result.detail) == (ProbeOutcome.UNREACHABLE, "the TLS handshake failed")
    assert rig.sink.reachable_calls() == [False]


class SessionTarget:
    """A stateful MCP-ish target: `initialize` opens a session (answered as an event
    stream), a session-less `ping` gets 400, `DELETE` answers `delete_status`."""

    def __init__(self, delete_status: int = 200) -> None:
        self.delete_status = delete_status
        self.methods: list[str] = []
        self.deletes: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "DELETE":
            self.deletes.append(dict(request.headers))
            return web.Response(status=self.delete_status)
        message = await request.json()
        self.methods.append(message["method"])
        if message["method"] != "initialize":
            return web.Response(status=400, text="Bad Request: Missing session ID")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Mcp-Session-Id": f"s{len(self.methods)}"})
        await response.prepare(request)
        result = {"jsonrpc": "2.0", "id": message["id"],
                  "result": {"protocolVersion": "2025-03-26", "capabilities": {}}}
        await response.write(f"event: message\ndata: {json.dumps(result)}\n\n".encode())
        await response.write_eof()
        return response


async def test_an_open_episode_is_probed_with_initialize_and_its_session_deleted(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    """While an episode is open each probe is an `initialize` whose event-stream 2xx
    reaches the observer as proof; its session is deleted with the negotiated version."""
    target = SessionTarget()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", target.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    assert server.port is not None  # started, so bound
    observer = Observer()
    prober = HealthProber(_config(server.port), session=session, credentials=Credentials(),
                          conditions=Sink(), observer=observer, proof_wanted=lambda: True)
    for _ in range(2):
        await prober.probe_once()
    assert target.methods == ["initialize", "initialize"]
    assert [e.status for e in observer.exchanges] == [200, 200]
    assert [d["Mcp-Session-Id"] for d in target.deletes] == ["s1", "s2"]
    assert all(d["MCP-Protocol-Version"] == "2025-03-26" for d in target.deletes)
    assert all(d[hdrs.AUTHORIZATION] == f"Bearer {TOKEN}" for d in target.deletes)


async def test_a_target_that_refuses_delete_with_405_is_not_asked_again(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    """A target answering the session DELETE with 405 gets no further DELETEs; once no
    episode is open, probes go back to a plain `ping`."""
    target = SessionTarget(delete_status=405)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", target.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    assert server.port is not None  # started, so bound
    episode = [True]
    prober = HealthProber(_config(server.port), session=session, credentials=Credentials(),
                          conditions=Sink(), observer=Observer(),
                          proof_wanted=lambda: episode[0])
    for _ in range(3):
        await prober.probe_once()
    episode[0] = False
    await prober.probe_once()
    assert target.methods == ["initialize"] * 3 + ["ping"]
    assert len(target.deletes) == 1


async def test_without_a_credential_source_probes_only_ping(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    """With no credential of its own the proxy has nothing to prove: every probe is a
    plain `ping` and no session is ever opened on the target."""
    target = SessionTarget()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", target.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    assert server.port is not None  # started, so bound
    prober = HealthProber(_config(server.port), session=session, credentials=None,
                          conditions=Sink(), observer=Observer(), proof_wanted=lambda: True)
    for _ in range(2):
        assert (await prober.probe_once()).outcome is ProbeOutcome.REACHABLE
    assert target.methods == ["ping", "ping"]
    assert target.deletes == []
