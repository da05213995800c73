"""Security-suite fixtures: a proxy holding a known secret, and a leak check after every test.

Every test here runs under `structlog.testing.capture_logs`; afterwards the captured
events, any CLI stderr a test registered, and every status file under the test's state
directory are searched for the secret and its pieces. A test cannot pass by leaking.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpRawServer
from structlog.testing import capture_logs
from structlog.typing import EventDict

from proxy import AuthProxy, ProxyConfig
from proxy.monitor.auth import UnauthorizedCallback

from helpers import Handler, Started, UpstreamFactory, write_secret

SECRET = "sk-live-7f3a9c1e5b2d4f6a8c0e"
CLIENT_SECRET = "client-own-bearer-1b2c3d4e5f"
COOKIE_SECRET = "session-cookie-9z8y7x6w"
QUERY_SECRET = "query-apikey-abc123def456"
SECRETS = (SECRET, CLIENT_SECRET, COOKIE_SECRET, QUERY_SECRET)


@dataclass
class LeakWatch:
    """What the autouse check searches: logs, extra text (CLI stderr) and state dirs."""

    logs: list[EventDict] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)

    def haystacks(self) -> Iterator[tuple[str, str]]:
        for entry in self.logs:
            yield "log event", json.dumps(entry, default=repr)
        for text in self.texts:
            yield "process output", text
        for folder in self.dirs:
            if folder.exists():
                for path in folder.rglob("*"):
                    if path.is_file():
                        yield str(path), path.read_text(errors="replace")


@pytest.fixture(autouse=True)
def leak_watch(tmp_path: Path) -> Iterator[LeakWatch]:
    """Fail the test if any secret shows up in logs, registered output or status files."""
    watch = LeakWatch(dirs=[tmp_path / "state"])
    with capture_logs() as logs:
        watch.logs = logs
        yield watch
    for where, text in watch.haystacks():
        for secret in SECRETS:
            assert secret not in text, f"a credential leaked into {where}: {text[:300]}"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return write_secret(tmp_path / "token", SECRET)


class AuthProxyFactory(Protocol):
    """`make_authproxy`: a started `AuthProxy` for `target_url` holding SECRET; `config`
    passed to `ProxyConfig`."""

    def __call__(self, target_url: str, *, on_unauthorized: UnauthorizedCallback | None = None,
                 **config: Any) -> Awaitable[AuthProxy]: ...


@pytest.fixture
async def make_authproxy(tmp_path: Path, token_file: Path) -> AsyncIterator[AuthProxyFactory]:
    """Start a full `AuthProxy` holding SECRET as a bearer token file; stopped at teardown."""
    async with Started() as started:

        async def factory(target_url: str, *,
                          on_unauthorized: UnauthorizedCallback | None = None,
                          **config: Any) -> AuthProxy:
            config.setdefault("state_dir", tmp_path / "state")
            config.setdefault("bearer_token_file", token_file)
            config.setdefault("health_interval", 0)
            config.setdefault("drain_timeout", 0.5)
            return await started.start(AuthProxy(ProxyConfig(target_url=target_url, **config),
                                                 on_unauthorized=on_unauthorized))

        yield factory


ServeMcp = Callable[[Handler], Awaitable[str]]  # `serve_mcp`


@pytest.fixture
async def serve_mcp(make_upstream: UpstreamFactory) -> ServeMcp:
    """Start a loopback upstream answering every request with `handler`: its /mcp URL."""

    async def serve(handler: Handler) -> str:
        server = await make_upstream(handler)
        return str(server.make_url("/mcp"))

    return serve


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Recorder:
    """A real upstream that keeps what it received and answers 200 `ok`."""

    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    proxy: AuthProxy | None = None  # one started in front of it, kept across examples

    async def handler(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, list(request.headers.items()),
                              body))
        return web.Response(text="ok")


@pytest.fixture
async def recorder(aiohttp_raw_server: AiohttpRawServer) -> Recorder:
    """A low-level upstream (no router), so even paths a router would refuse are recorded."""
    rec = Recorder()
    server = await aiohttp_raw_server(rec.handler, host="127.0.0.1")
    rec.url = str(server.make_url("/mcp"))
    return rec


@pytest.fixture
async def proxy(make_authproxy: AuthProxyFactory, recorder: Recorder) -> AuthProxy:
    """A proxy in front of `recorder`."""
    return await make_authproxy(recorder.url)
