"""Harness for the sign-in tests: a real authorization server, a protected MCP target,
a scripted person, and the CLI run as the user runs it.

- `authserver`: node-oidc-provider (`authserver/server.mjs`, installed by
  `scripts/install-test-deps`) started on a free loopback port, stopped by PID.
- `target`: the SDK MCP server behind an RFC 9728 / introspection gate (`target.py`).
- `cli`: runs `python -m proxy ...` as a subprocess with `$BROWSER` set to
  `browser.py`, which completes the login and consent pages by HTTP requests.
Every wait is bounded; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .target import GateSettings, ProtectedTarget
from helpers import Started, run_cli

HERE = Path(__file__).parent
SERVER_DIR = HERE / "authserver"
BROWSER = HERE / "browser.py"
AS_START_TIMEOUT = 20.0
CLI_TIMEOUT = 45.0
RS_CLIENT = ("mcp-target", "mcp-target-introspection-secret")


@dataclass
class AuthServer:
    """One node-oidc-provider process."""

    process: subprocess.Popen[bytes]
    issuer: str
    log: Path

    @property
    def origin(self) -> str:
        return self.issuer.rsplit("/oidc", 1)[0]

    def url(self, path: str) -> str:
        return self.issuer + path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_authserver(log: Path, **env: str) -> AuthServer:
    node = shutil.which("node")
    if node is None or not (SERVER_DIR / "node_modules" / "oidc-provider").is_dir():
        pytest.fail("the test authorization server is not installed: "
                    "run scripts/install-test-deps (needs node and npm)")
    with open(log, "ab") as err:
        process = subprocess.Popen(
            [node, str(SERVER_DIR / "server.mjs")], cwd=SERVER_DIR,
            stdout=subprocess.PIPE, stderr=err, env={**os.environ, "AS_PORT": "0", **env})
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + AS_START_TIMEOUT
    line = b""
    try:
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise RuntimeError(f"authorization server did not start; see {log}")
            chunk = os.read(process.stdout.fileno(), 1024)
            if not chunk:
                raise RuntimeError(f"authorization server exited; see {log}")
            line += chunk
    except BaseException:
        process.kill()
        process.wait(timeout=5)
        raise
    finally:
        selector.close()
    word, issuer = line.decode().split()[:2]
    assert word == "ready", line
    return AuthServer(process, issuer, log)


def restart_authserver(server: AuthServer) -> AuthServer:
    """The same issuer (same port) started afresh: its storage is in memory, so every
    registered client, grant and token it issued is forgotten, as when a server drops
    dynamically registered clients."""
    port = server.issuer.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]
    server.stop()
    return start_authserver(server.log, AS_PORT=port)


def registrations(server: AuthServer) -> list[str]:
    """Client ids registered at `server` (Dynamic Client Registration), oldest first,
    across its restarts (they share the log)."""
    return [line.split()[1] for line in server.log.read_text().splitlines()
            if line.startswith("registered ")]


@pytest.fixture(scope="session")
def authserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    """One authorization server for the session (clients and grants are per test)."""
    server = start_authserver(tmp_path_factory.mktemp("authserver") / "server.log")
    yield server
    server.stop()


@pytest.fixture
def short_lived_authserver(tmp_path: Path) -> Iterator[AuthServer]:
    """An authorization server whose access tokens live 3 seconds."""
    server = start_authserver(tmp_path / "short-as.log", AS_ACCESS_TTL="3")
    yield server
    server.stop()


TargetFactory = Callable[..., Awaitable[ProtectedTarget]]


@pytest.fixture
async def make_target() -> AsyncIterator[TargetFactory]:
    """Starts protected MCP targets for an authorization server; stops them."""
    async with Started() as started:

        async def make(server: AuthServer, **knobs: Any) -> ProtectedTarget:
            settings = GateSettings(issuer=server.issuer,
                                    introspection_url=server.url("/token/introspection"),
                                    rs_client=RS_CLIENT, **knobs)
            return await started.start(ProtectedTarget(settings))

        yield make


@pytest.fixture
async def target(authserver: AuthServer, make_target: TargetFactory) -> ProtectedTarget:
    return await make_target(authserver)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


class Running:
    """A CLI process the test talks to while it runs."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr_lines: list[str] = []

    async def stderr_line(self, contains: str, timeout: float = CLI_TIMEOUT) -> str:
        """The first stderr line containing `contains` (lines before it are kept)."""
        assert self.process.stderr is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.process.stderr.readline()
                if not raw:
                    raise AssertionError(f"no {contains!r} on stderr: {self.stderr_lines}")
                line = raw.decode().rstrip("\n")
                self.stderr_lines.append(line)
                if contains in line:
                    return line

    async def stdout_line(self, timeout: float = CLI_TIMEOUT) -> str:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        return raw.decode().rstrip("\n")

    async def finish(self, timeout: float = CLI_TIMEOUT) -> Result:
        """Waits for exit; stdout and the rest of stderr."""
        assert self.process.stdout is not None and self.process.stderr is not None
        out, err = await asyncio.wait_for(self.process.communicate(), timeout)
        assert self.process.returncode is not None
        return Result(self.process.returncode, out.decode(),
                      "\n".join(self.stderr_lines) + "\n" + err.decode())


async def open_in_browser(url: str, *args: str, mode: str = "consent",
                          log: Path | None = None) -> int:
    """Runs the person (`browser.py`) on `url` the way a user would paste it."""
    env = {**os.environ, "SIGNIN_BROWSER_MODE": mode}
    if log is not None:
        env["SIGNIN_BROWSER_LOG"] = str(log)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(BROWSER), *args, url, env=env, stdin=subprocess.DEVNULL)
    return await asyncio.wait_for(process.wait(), CLI_TIMEOUT)


@dataclass
class Cli:
    """`python -m proxy` as the user runs it, the person being `browser.py`."""

    state_dir: Path
    browser_log: Path

    def env(self, mode: str = "consent", **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_AUTHPROXY_")}
        env.update(BROWSER=str(BROWSER), SIGNIN_BROWSER_MODE=mode,
                   SIGNIN_BROWSER_LOG=str(self.browser_log),
                   MCP_AUTHPROXY_STATE_DIR=str(self.state_dir), **extra)
        return env

    async def run(self, *args: str, mode: str = "consent", timeout: float = CLI_TIMEOUT,
                  **extra: str) -> Result:
        return Result(*await run_cli(args, self.env(mode, **extra), timeout))

    async def login(self, *args: str, **kwargs: Any) -> Result:
        return await self.run("login", *args, **kwargs)

    @contextlib.asynccontextmanager
    async def started(self, *args: str, mode: str = "consent", **extra: str
                      ) -> AsyncIterator[Running]:
        """`python -m proxy ARGS` running; its stderr read line by line meanwhile."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", *args, env=self.env(mode, **extra),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        running = Running(process)
        try:
            yield running
        finally:
            if process.returncode is None:
                process.kill()
            await asyncio.wait_for(process.wait(), 10)

    def browser_steps(self) -> list[dict[str, Any]]:
        if not self.browser_log.exists():
            return []
        return [json.loads(line) for line in self.browser_log.read_text().splitlines()]

    def signin_file(self, name: str) -> Path:
        return self.state_dir / "credentials" / f"{name}.json"

    def signin(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.signin_file(name).read_text())
        return data

    def credential_files(self) -> list[Path]:
        folder = self.state_dir / "credentials"
        if not folder.exists():
            return []
        return sorted(p for p in folder.rglob("*.json"))


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(state_dir=tmp_path / "state", browser_log=tmp_path / "browser.jsonl")
