"""The auth monitor: episodes, status, callbacks, driven by a real upstream's answers."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import hdrs, web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from multidict import CIMultiDict, CIMultiDictProxy
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

from proxy.credentials.base import Credential
from proxy.forwarding.observe import Exchange
from proxy.forwarding.rules import is_mcp_path
from proxy.monitor.auth import AuthMonitor, ReauthorizedEvent, UnauthorizedEvent
from proxy.monitor.hooks import exec_callback
from proxy.status import model as st
from proxy.status.model import ConditionType as C
from proxy.status.model import WorkloadStatus as S
from proxy.status.store import FileStore, MemoryStore
from proxy.status.workload import Workload

SECRET = "s3cr3t-token-value-never-stored"
EXPIRED = ('Bearer realm="example", error="invalid_token", '
           'error_description="The access token expired", '
           'resource_metadata="https://example.com/.well-known/oauth-protected-resource"')


class Upstream:
    """A real MCP-ish target: /mcp accepts one bearer token, the metadata path is public."""

    def __init__(self) -> None:
        self.accepted = SECRET

    async def mcp(self, request: web.Request) -> web.Response:
        if request.headers.get(hdrs.AUTHORIZATION) == f"Bearer {self.accepted}":
            return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})
        return web.json_response({"error": "unauthorized"}, status=401,
                                 headers={hdrs.WWW_AUTHENTICATE: EXPIRED})

    async def metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"resource": "https://example.com/mcp"})

    async def scoped(self, request: web.Request) -> web.Response:
        challenge = 'Bearer error="insufficient_scope", scope="files:write"'
        return web.Response(status=403, headers={hdrs.WWW_AUTHENTICATE: challenge})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/mcp", self.mcp)
        app.router.add_route("*", "/.well-known/oauth-protected-resource", self.metadata)
        app.router.add_route("*", "/mcp/scoped", self.scoped)
        return app


class Harness:
    """A workload on a real status file, its monitor, and what the callbacks saw."""

    def __init__(self, state_dir: Path, base: str, session: aiohttp.ClientSession, *,
                 credentials: bool = True, on_unauthorized: Any = None) -> None:
        self.store = FileStore(state_dir, "w")
        self.workload = Workload(self.store)
        self.base = base
        self.session = session
        self.version = 1
        self.credential: Credential | None = Credential(f"Bearer {SECRET}", 1)
        self.unauthorized: list[UnauthorizedEvent] = []
        self.file_status_at_callback: list[str] = []
        self.reauthorized: list[ReauthorizedEvent] = []
        self.monitor = AuthMonitor(
            self.workload, mcp_path="/mcp", credentials_configured=credentials,
            current_version=lambda: self.version,
            on_unauthorized=on_unauthorized or self.record_unauthorized,
            on_reauthorized=self.reauthorized.append,
        )

    def record_unauthorized(self, event: UnauthorizedEvent) -> None:
        self.unauthorized.append(event)
        self.file_status_at_callback.append(json.loads(self.store.path.read_text())["status"])

    async def start(self) -> None:
        await self.workload.claim(st.Started(pid=os.getpid(), target_url="https://x/mcp"))
        await self.workload.apply(st.Serving(proxy_url="http://127.0.0.1:1/mcp"))

    async def call(self, path: str = "/mcp", *, credential: Credential | str | None = "current",
                   probe: bool = False) -> Exchange:
        """One real request to the upstream, reported to the monitor like the proxy does."""
        cred = self.credential if credential == "current" else credential
        assert not isinstance(cred, str)
        headers = {hdrs.AUTHORIZATION: cred.authorization} if cred else {}
        async with self.session.post(self.base + path, headers=headers) as resp:
            await resp.read()
            ex = Exchange(method="POST", path=path, on_mcp_path=is_mcp_path(path, "/mcp"),
                          status=resp.status, upstream_headers=resp.headers,
                          credential=cred, probe=probe)
        self.monitor.on_response(ex)
        return ex

    def file(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.store.path.read_text())
        return data

    async def settle(self) -> None:
        await asyncio.wait_for(self.monitor.flush(), 10)


UpstreamAt = tuple[Upstream, str]  # `upstream`: the target and its base URL


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> AsyncIterator[tuple[Upstream, str]]:
    target = Upstream()
    server = await aiohttp_server(target.app(), host="127.0.0.1")
    yield target, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def harness(tmp_path: Path, upstream: UpstreamAt,
                  session: aiohttp.ClientSession) -> Harness:
    h = Harness(tmp_path, upstream[1], session)
    await h.start()
    return h


async def test_fifty_concurrent_401s_open_one_episode(
    harness: Harness, upstream: UpstreamAt
) -> None:
    """A burst of 401s marks the workload unauthenticated once and calls back exactly once."""
    upstream[0].accepted = "rotated"
    with capture_logs() as logs:
        results = await asyncio.gather(*(harness.call() for _ in range(50)))
        await harness.settle()
    assert {ex.status for ex in results} == {401}
    assert len(harness.unauthorized) == 1
    event = harness.unauthorized[0]
    assert (event.workload, event.status_code, event.method, event.path) == (
        "w", 401, "POST", "/mcp")
    assert (event.error, event.error_description) == ("invalid_token", "The access token expired")
    assert event.resource_metadata == "https://example.com/.well-known/oauth-protected-resource"
    assert event.www_authenticate == EXPIRED and event.at.tzinfo is not None
    data = harness.file()
    assert (data["status"], data["reason"], data["message"]) == (
        "unauthenticated", "UpstreamUnauthorized",
        "target answered 401 (invalid_token: The access token expired)")
    warnings = [e for e in logs if e["event"] == "unauthorized"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert (warnings[0]["workload"], warnings[0]["error"]) == ("w", "invalid_token")


async def test_callback_runs_only_after_the_file_says_unauthenticated(harness: Harness,
                                                                      upstream: UpstreamAt) -> None:
    """Whoever the callback alerts finds the status file already saying unauthenticated."""
    upstream[0].accepted = "rotated"
    await harness.call()
    assert harness.unauthorized == []  # nothing before the write landed
    await harness.settle()
    assert harness.file_status_at_callback == ["unauthenticated"]


async def test_episode_lifecycle_proof_and_public_paths(
    harness: Harness, upstream: UpstreamAt
) -> None:
    """Only a good answer on the MCP path ends an episode; a new 401 then opens a second one."""
    target: Upstream = upstream[0]
    target.accepted = "rotated"
    await harness.call()
    await harness.settle()
    assert harness.monitor.episode_open

    metadata = await harness.call("/.well-known/oauth-protected-resource")
    assert metadata.status == 200
    await harness.settle()
    assert harness.monitor.episode_open and harness.reauthorized == []
    assert harness.file()["status"] == "unauthenticated"

    # A runner saying "running" meanwhile changes nothing (rule 3).
    assert (await harness.workload.apply(st.Serving())).status is S.UNAUTHENTICATED

    target.accepted = SECRET
    assert (await harness.call()).status == 200
    await harness.settle()
    assert not harness.monitor.episode_open
    assert len(harness.reauthorized) == 1
    assert harness.reauthorized[0].unauthorized_since == harness.unauthorized[0].at
    assert harness.file()["status"] == "running"

    await harness.call()  # more proof: nothing new
    target.accepted = "rotated-again"
    await harness.call()
    await harness.settle()
    assert (len(harness.unauthorized), len(harness.reauthorized)) == (2, 1)
    assert harness.file()["status"] == "unauthenticated"


async def test_only_the_current_credential_proves(harness: Harness, upstream: UpstreamAt) -> None:
    """An answer to a replaced credential neither ends nor opens an episode."""
    upstream[0].accepted = "rotated"
    await harness.call()
    old = harness.credential
    harness.version = 2  # the source loaded a new token
    harness.credential = Credential("Bearer rotated", 2)
    upstream[0].accepted = SECRET
    await harness.call(credential=old)  # a late 200 for the old token
    await harness.settle()
    assert harness.monitor.episode_open
    upstream[0].accepted = "rotated"
    await harness.call()
    await harness.settle()
    assert not harness.monitor.episode_open
    await harness.call(credential=old)  # a late 401 for the old token
    await harness.settle()
    assert not harness.monitor.episode_open and len(harness.unauthorized) == 1


async def test_raising_and_slow_callbacks_do_not_hold_up_forwarding(
    tmp_path: Path, upstream: UpstreamAt, session: aiohttp.ClientSession
) -> None:
    """A callback that hangs or raises leaves requests flowing and status moving."""
    release = asyncio.Event()
    entered = asyncio.Event()
    calls = 0

    async def slow_then_raise(event: UnauthorizedEvent) -> None:
        nonlocal calls
        calls += 1
        entered.set()
        await release.wait()
        raise RuntimeError("callback bug")

    h = Harness(tmp_path, upstream[1], session, on_unauthorized=slow_then_raise)
    await h.start()
    upstream[0].accepted = "rotated"
    with capture_logs() as logs:
        await h.call()
        await asyncio.wait_for(entered.wait(), 10)
        upstream[0].accepted = SECRET
        results = await asyncio.wait_for(asyncio.gather(*(h.call() for _ in range(10))), 10)
        assert {ex.status for ex in results} == {200}
        await asyncio.wait_for(h.workload.flush(), 10)
        assert h.file()["status"] == "running"  # the episode ended while the callback hung
        release.set()
        await h.settle()
    assert calls == 1 and len(h.reauthorized) == 1
    failures = [e for e in logs if e["event"] == "callback_failed"]
    assert len(failures) == 1 and failures[0]["callback"] == "on_unauthorized"


async def test_reauthorized_never_overtakes_unauthorized(
    tmp_path: Path, upstream: UpstreamAt, session: aiohttp.ClientSession
) -> None:
    """Even when the proof follows at once, the runner hears "unauthorized" before "back"."""
    order: list[str] = []

    async def slow_start(event: UnauthorizedEvent) -> None:
        order.append("unauthorized")
        await asyncio.sleep(0)

    h = Harness(tmp_path, upstream[1], session, on_unauthorized=slow_start)
    h.monitor._on_reauthorized = lambda event: order.append("reauthorized")
    await h.start()
    upstream[0].accepted = "rotated"
    await h.call()
    upstream[0].accepted = SECRET
    await h.call()
    await h.settle()
    assert order == ["unauthorized", "reauthorized"]


async def test_sync_raising_callback_is_logged(tmp_path: Path, upstream: UpstreamAt,
                                               session: aiohttp.ClientSession) -> None:
    """A plain callback that raises is logged and the next episode still calls back."""
    seen: list[UnauthorizedEvent] = []

    def broken(event: UnauthorizedEvent) -> None:
        seen.append(event)
        raise ValueError("boom")

    h = Harness(tmp_path, upstream[1], session, on_unauthorized=broken)
    await h.start()
    with capture_logs() as logs:
        for accepted in ("rotated", SECRET, "rotated-again"):
            upstream[0].accepted = accepted
            await h.call()
            await h.settle()
    assert len(seen) == 2
    assert [e["event"] for e in logs].count("callback_failed") == 2


async def test_probes_with_and_without_a_credential_source(
    tmp_path: Path, upstream: UpstreamAt, session: aiohttp.ClientSession
) -> None:
    """A probe's 401 opens an episode only when the proxy injects a credential."""
    upstream[0].accepted = "rotated"
    without = Harness(tmp_path / "a", upstream[1], session, credentials=False)
    await without.start()
    await without.call(credential=None, probe=True)
    await without.settle()
    assert not without.monitor.episode_open and without.file()["status"] == "running"

    with_source = Harness(tmp_path / "b", upstream[1], session)
    await with_source.start()
    await with_source.call(probe=True)
    await with_source.settle()
    assert with_source.monitor.episode_open and len(with_source.unauthorized) == 1


async def test_without_a_source_any_good_mcp_answer_proves(
    tmp_path: Path, upstream: UpstreamAt, session: aiohttp.ClientSession
) -> None:
    """When clients bring their own token, their 401 opens and their next 200 closes."""
    h = Harness(tmp_path, upstream[1], session, credentials=False)
    await h.start()
    await h.call(credential=Credential("Bearer wrong", 0))
    await h.settle()
    assert h.file()["status"] == "unauthenticated"
    await h.call(credential=Credential(f"Bearer {SECRET}", 0))
    await h.settle()
    assert h.file()["status"] == "running" and len(h.reauthorized) == 1


async def test_insufficient_scope(harness: Harness) -> None:
    """A 403 insufficient_scope shows the needed scope, keeps running, and heals on a 200."""
    assert (await harness.call("/mcp/scoped")).status == 403
    await harness.settle()
    data = harness.file()
    assert data["status"] == "running"
    [authorized] = [c for c in data["conditions"] if c["type"] == "Authorized"]
    assert (authorized["status"], authorized["reason"]) == ("False", "InsufficientScope")
    assert "files:write" in authorized["message"]
    await harness.call()
    await harness.settle()
    [authorized] = [c for c in harness.file()["conditions"] if c["type"] == "Authorized"]
    assert authorized["status"] == "True"


async def test_credential_source_failures(harness: Harness, upstream: UpstreamAt) -> None:
    """An invalid source opens an episode; a transient one only retries; healing waits for proof."""
    monitor = harness.monitor
    monitor.credential_state(False, "TokenRefreshRetrying", "refreshing keeps failing", False)
    await harness.settle()
    assert harness.file()["status"] == "auth_retrying" and harness.unauthorized == []
    monitor.credential_state(False, "TokenFileMissing", "token file /run/t is missing", True)
    await harness.settle()
    data = harness.file()
    assert (data["status"], data["reason"]) == ("unauthenticated", "TokenFileMissing")
    [event] = harness.unauthorized
    assert (event.status_code, event.method, event.path, event.reason) == (
        None, None, None, "TokenFileMissing")
    assert harness.file_status_at_callback == ["unauthenticated"]
    monitor.credential_state(True, "TokenLoaded", "token file /run/t loaded", False)
    await harness.settle()
    assert harness.file()["status"] == "unauthenticated" and monitor.episode_open
    await harness.call()
    await harness.settle()
    assert harness.file()["status"] == "running" and len(harness.reauthorized) == 1


async def test_no_io_per_request(upstream: UpstreamAt, session: aiohttp.ClientSession) -> None:
    """Steady traffic writes nothing: the status file changes only with a condition."""
    store = MemoryStore("w")
    workload = Workload(store)
    monitor = AuthMonitor(workload, mcp_path="/mcp", credentials_configured=True,
                          current_version=lambda: 1)
    await workload.apply(st.Serving())
    credential = Credential(f"Bearer {SECRET}", 1)
    headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
    ok = Exchange("POST", "/mcp", True, 200, headers, credential)
    monitor.on_response(ok)
    await monitor.flush()
    writes = store.writes
    for _ in range(200):
        monitor.on_response(ok)
    await monitor.flush()
    assert store.writes == writes


async def test_steady_good_answers_do_no_status_work() -> None:
    """Once the view holds what a good MCP answer would set, later good answers ask
    nothing (not even the credential's version) until the view changes."""
    asked = 0

    def version() -> int:
        nonlocal asked
        asked += 1
        return 1

    store = MemoryStore("w")
    workload = Workload(store)
    monitor = AuthMonitor(workload, mcp_path="/mcp", credentials_configured=True,
                          current_version=version)
    await workload.apply(st.Serving())
    headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
    ok = Exchange("POST", "/mcp", True, 200, headers, Credential(f"Bearer {SECRET}", 1))
    monitor.on_response(ok)
    assert asked == 1
    for _ in range(100):
        monitor.on_response(ok)
    assert asked == 1
    # Any change of the view (here an unrelated condition) makes the next answer look.
    monitor.credential_state(True, "TokenLoaded", "token loaded", False)
    monitor.on_response(ok)
    monitor.on_response(ok)
    assert asked == 2
    # So does the writer rebuilding the view from the store's answer.
    await monitor.flush()
    monitor.on_response(ok)
    assert asked == 3
    view = workload.view
    assert view.status is S.RUNNING
    assert [(c.type, c.status) for c in view.conditions] == [
        (C.AUTHENTICATED, True), (C.CREDENTIAL_AVAILABLE, True), (C.AUTHORIZED, True)]


async def test_settled_monitor_still_sees_every_change(harness: Harness) -> None:
    """After steady good answers, a 403 scope, a cleared record and an invalid source
    each still take effect, and the next good answer heals them as before."""
    for _ in range(3):
        await harness.call()
    await harness.settle()

    def conditions() -> dict[str, tuple[str, str]]:
        return {c["type"]: (c["status"], c["reason"]) for c in harness.file()["conditions"]}

    assert conditions() == {"Authenticated": ("True", "CredentialAccepted"),
                            "Authorized": ("True", "Authorized")}
    assert (await harness.call("/mcp/scoped")).status == 403
    await harness.settle()
    assert conditions()["Authorized"] == ("False", "InsufficientScope")
    await harness.call()
    await harness.settle()
    assert conditions()["Authorized"] == ("True", "Authorized")

    # A new claim (a restart under the same name) starts with no conditions at all.
    await harness.start()
    assert conditions() == {}
    await harness.call()
    await harness.settle()
    assert conditions() == {"Authenticated": ("True", "CredentialAccepted"),
                            "Authorized": ("True", "Authorized")}

    harness.monitor.credential_state(False, "TokenFileMissing", "token file missing", True)
    await harness.call()
    await harness.settle()
    assert len(harness.unauthorized) == 1 and len(harness.reauthorized) == 1
    assert harness.file()["status"] == "unauthenticated"  # the source is still invalid
    harness.monitor.credential_state(True, "TokenLoaded", "token file loaded", False)
    await harness.call()
    await harness.settle()
    assert harness.file()["status"] == "running" and not harness.monitor.episode_open


async def test_no_credential_in_file_or_logs(harness: Harness, upstream: UpstreamAt) -> None:
    """The injected token never appears in the status file or in any log event."""
    with capture_logs() as logs:
        upstream[0].accepted = "rotated"
        await harness.call()
        await harness.call("/mcp/scoped")
        upstream[0].accepted = SECRET
        await harness.call()
        await harness.settle()
    assert SECRET not in harness.store.path.read_text()
    assert SECRET not in repr(logs)
    assert SECRET not in repr(harness.unauthorized)


async def test_exec_callback_runs_a_real_command(tmp_path: Path, harness: Harness) -> None:
    """--on-unauthorized-exec runs the command with the event as JSON in its environment."""
    out = tmp_path / "event.json"
    script = ("import os, sys; "
              "open(sys.argv[1], 'w').write(os.environ['MCP_AUTHPROXY_EVENT'])")
    callback = exec_callback(f"{sys.executable} -c \"{script}\" {out}")
    event = UnauthorizedEvent(
        workload="w", status_code=401, method="POST", path="/mcp",
        reason="UpstreamUnauthorized", message="target answered 401 (invalid_token)",
        www_authenticate=EXPIRED, error="invalid_token", error_description=None,
        resource_metadata=None, at=st.now())
    result = callback(event)
    assert result is not None
    await asyncio.wait_for(result, 20)
    data = json.loads(out.read_text())
    assert (data["type"], data["workload"], data["status_code"], data["error"]) == (
        "unauthorized", "w", 401, "invalid_token")
    assert data["at"].endswith("Z")


async def test_exec_callback_failures_are_logged(tmp_path: Path) -> None:
    """A command that cannot start or fails is logged, never raised."""
    event = UnauthorizedEvent(
        workload="w", status_code=None, method=None, path=None, reason="TokenFileMissing",
        message="m", www_authenticate=None, error=None, error_description=None,
        resource_metadata=None, at=st.now())
    with capture_logs() as logs:
        for command in (str(tmp_path / "no-such-command"), f"{sys.executable} -c 'exit(3)'"):
            result = exec_callback(command)(event)
            assert result is not None
            await asyncio.wait_for(result, 20)
    failures = [e for e in logs if e["event"] == "on_unauthorized_exec_failed"]
    assert len(failures) == 2 and failures[1]["exit_code"] == 3


# --- property: no sequence of events shows `running` while an episode is open ----------

_ACTIONS = hs.sampled_from([
    "401", "probe401", "proof", "stale_proof", "wellknown200", "probe_proof", "serving",
    "source_invalid", "source_retrying", "source_healed", "new_version", "403", "flush",
])


async def _run_actions(actions: list[str]) -> None:
    version = 1
    store = MemoryStore("w")
    workload = Workload(store)
    monitor = AuthMonitor(workload, mcp_path="/mcp", credentials_configured=True,
                          current_version=lambda: version)
    await workload.claim(st.Started(pid=os.getpid(), target_url="https://x/mcp"))
    challenge = CIMultiDictProxy(CIMultiDict({hdrs.WWW_AUTHENTICATE: EXPIRED}))
    scope = CIMultiDictProxy(CIMultiDict(
        {hdrs.WWW_AUTHENTICATE: 'Bearer error="insufficient_scope", scope="x"'}))
    plain: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())

    def ex(status: int, headers: CIMultiDictProxy[str], *, path: str = "/mcp",
           v: int | None = None, probe: bool = False) -> Exchange:
        cred = Credential("Bearer t", version if v is None else v)
        return Exchange("POST", path, path == "/mcp", status, headers, cred, probe=probe)

    steps: dict[str, Callable[[], Any]] = {
        "401": lambda: monitor.on_response(ex(401, challenge)),
        "probe401": lambda: monitor.on_response(ex(401, challenge, probe=True)),
        "proof": lambda: monitor.on_response(ex(200, plain)),
        "stale_proof": lambda: monitor.on_response(ex(200, plain, v=version - 1)),
        "wellknown200": lambda: monitor.on_response(
            ex(200, plain, path="/.well-known/oauth-protected-resource")),
        "probe_proof": lambda: monitor.on_response(ex(204, plain, probe=True)),
        "serving": lambda: asyncio.ensure_future(workload.apply(st.Serving())),
        "source_invalid": lambda: monitor.credential_state(False, "TokenFileMissing", "m", True),
        "source_retrying": lambda: monitor.credential_state(
            False, "TokenRefreshRetrying", "m", False),
        "source_healed": lambda: monitor.credential_state(True, "TokenLoaded", "m", False),
        "403": lambda: monitor.on_response(ex(403, scope)),
    }
    for action in actions:
        if action == "new_version":
            version += 1
        elif action == "flush":
            await monitor.flush()
        else:
            steps[action]()
        if monitor.episode_open:
            assert workload.view.status is not S.RUNNING
            if action == "flush":
                assert workload.record.status is not S.RUNNING
        await asyncio.sleep(0)  # let the writer interleave with the next decision
    await monitor.flush()
    for record in (workload.record, store.record):
        assert record is not None
        if monitor.episode_open:
            assert record.status is not S.RUNNING
        cond = record.condition(C.AUTHENTICATED)
        assert (cond is not None and not cond.status) == monitor.episode_open


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.lists(_ACTIONS, max_size=40))
def test_never_running_while_an_episode_is_open(actions: list[str]) -> None:
    """No mix of 401s, proofs, probes, runner calls and source changes shows running mid-episode."""
    asyncio.run(_run_actions(actions))
