"""Fixtures for replicas: a real `redis-server` of our own, and replica processes.

The server runs on a free loopback port with persistence off and is stopped by its
pid (never a system service; `scripts/install-redis` installs the Debian package).
Replicas are real processes (`replica.py`: the CLI's `run` flags, shortened
tunables), stopped by pid at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config import parse_store
from proxy.status.redis import read_shared

from helpers import eventually

HERE = Path(__file__).parent
WAIT = 20.0  # every wait in these tests is bounded by this (seconds)
REQUIRE_REDIS = "MCP_AUTHPROXY_TESTS_REQUIRE_REDIS"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RedisServer:
    """A redis-server process of this test's own; `stop`/`start` keep the port."""

    directory: Path
    password: str | None = None
    port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None
    tls: bool = False  # TLS only (rediss://), with a test CA of its own

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return (f"rediss://{auth}127.0.0.1:{self.port}/0"
                    f"?ssl_ca_certs={self.directory / 'ca.pem'}")
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            # CI installs it (scripts/install-redis) and sets REQUIRE_REDIS: never skipped there.
            message = "redis-server is missing: run scripts/install-redis (as root)"
            if os.environ.get(REQUIRE_REDIS):
                pytest.fail(message)
            pytest.skip(message)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.directory), "--loglevel", "notice"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            d = self.directory
            if not (d / "ca.pem").exists():
                ca = trustme.CA()
                cert = ca.issue_cert("127.0.0.1")
                ca.cert_pem.write_to_path(str(d / "ca.pem"))
                cert.private_key_pem.write_to_path(str(d / "key.pem"))
                cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
            args[args.index("--port") + 1] = "0"
            args += ["--tls-port", str(self.port), "--tls-cert-file", str(d / "cert.pem"),
                     "--tls-key-file", str(d / "key.pem"), "--tls-ca-cert-file",
                     str(d / "ca.pem"), "--tls-auth-clients", "no"]
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        assert self.proc.stdout is not None
        async with asyncio.timeout(WAIT):
            while b"Ready to accept connections" not in await self.proc.stdout.readline():
                if self.proc.returncode is not None:
                    pytest.fail(f"redis-server exited with {self.proc.returncode}")
        # Keep draining its log so it never blocks on a full pipe.
        self._drain = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while await self.proc.stdout.readline():
            pass

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGKILL)  # no shutdown save: it is a crash, not a stop
        await asyncio.wait_for(self.proc.wait(), WAIT)
        await asyncio.wait_for(self._drain, WAIT)

    def client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url)


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    await server.start()
    yield server
    await server.stop()


@dataclass
class Replica:
    """One replica process: its client URL, its stderr (JSON log lines), its pid."""

    proc: asyncio.subprocess.Process
    url: str = ""
    lines: list[str] = field(default_factory=list)
    _pump: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode())
            self.changed.set()

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if data.get("event") == name:
                out.append(data)
        return out

    async def wait_log(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        async with asyncio.timeout(WAIT):
            while len(found := self.events(name)) < count:
                self.changed.clear()
                await self.changed.wait()
        return found

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            code = await asyncio.wait_for(asyncio.shield(self.proc.wait()), WAIT)
        except TimeoutError:
            # Say where it hangs: the replica prints its tasks' stacks on SIGUSR1.
            self.proc.send_signal(signal.SIGUSR1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 2.0)
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), WAIT)
            if self._pump is not None:
                await asyncio.wait_for(self._pump, WAIT)
            pytest.fail(f"replica {self.pid} did not exit within {WAIT} s of signal {sig}; "
                        "its log:\n" + "".join(self.lines[-200:]))
        if self._pump is not None:
            await asyncio.wait_for(self._pump, WAIT)
        return code


async def start_replica(run_flags: Sequence[str], *, events: Path | None = None,
                        tunables: dict[str, float] | None = None,
                        wait_url: bool = True) -> Replica:
    ours: list[str] = []
    if events is not None:
        ours += ["--events", str(events)]
    # A stop's every wait is bounded by drain_timeout (twice at most): shortened so a
    # replica that is slow to stop is told apart from one that hangs, well inside WAIT.
    for name, value in {"drain_timeout": 3.0, **(tunables or {})}.items():
        ours += ["--tunable", f"{name}={value}"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "replica.py"), *ours, "--", *run_flags,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    replica = Replica(proc)
    replica._pump = asyncio.ensure_future(replica._read())
    if wait_url:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), WAIT)
        replica.url = line.decode().strip()
        assert replica.url, "".join(replica.lines)
    return replica


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    """Every replica a test starts; any still running at teardown is killed by pid."""
    started: list[Replica] = []
    yield started
    for replica in started:
        if replica.proc.returncode is None:
            await replica.stop(signal.SIGKILL)


@dataclass
class GatedUpstream:
    """A target that answers 200 to `Bearer <good>` on /mcp and 401 to anything else."""

    server: TestServer
    good: str
    seen: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return str(self.server.make_url("/mcp"))


@pytest.fixture
async def gated_upstream() -> AsyncIterator[GatedUpstream]:
    holder: list[GatedUpstream] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        gate = holder[0]
        auth = request.headers.get("Authorization", "")
        gate.seen.append(auth)
        if auth != f"Bearer {gate.good}":
            return web.json_response(
                {"error": "invalid_token"}, status=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token", '
                         'error_description="The access token is not valid"'})
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    holder.append(GatedUpstream(server, good="token-one-0123456789"))
    yield holder[0]
    await server.close()


# --- reading what replicas wrote ---------------------------------------------------------


async def shared_record(redis: RedisServer, name: str = "shared") -> dict[str, Any]:
    records = await read_shared(parse_store(redis.url), name)
    return records[0].to_dict() if records else {}


async def wait_record(redis: RedisServer,
                      predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The shared record once `predicate(record)` holds (other processes write it)."""
    async def holds() -> dict[str, Any] | None:
        record = await shared_record(redis)
        return record if predicate(record) else None

    return await eventually(holds, WAIT, what="the shared record")


def read_lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines()]


async def wait_lines(path: Path, count: int) -> list[dict[str, Any]]:
    """The callback lines replicas appended to `path`, once there are `count` of them."""
    async def enough() -> list[dict[str, Any]] | None:
        lines = await asyncio.to_thread(read_lines, path)
        return lines if len(lines) >= count else None

    found: list[dict[str, Any]] = await eventually(enough, WAIT, what=f"{count} callbacks")
    return found


async def post(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with session.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}) as resp:
        return resp.status, await resp.json(content_type=None)


def refused(status: int, body: dict[str, Any]) -> bool:
    """The contract's answer during an episode with a credential source: 503 naming it."""
    return status == 503 and body.get("error") == "upstream_unauthorized"
