"""Helpers to run `mcp-authproxy` as a real subprocess and stop it by its PID."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import helpers


@dataclass
class ProxyProcess:
    proc: asyncio.subprocess.Process
    url: str = ""
    stderr_lines: list[str] = field(default_factory=list)
    _stderr_task: asyncio.Task[None] | None = None

    async def _pump(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr_lines.append(line.decode())

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            code = await self.proc.wait()
        if self._stderr_task is not None:
            await asyncio.wait_for(self._stderr_task, 5)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)


async def start_proxy(args: Sequence[str], env: dict[str, str] | None = None,
                      wait_url: bool = True) -> ProxyProcess:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    pp = ProxyProcess(proc)
    pp._stderr_task = asyncio.create_task(pp._pump())
    if wait_url:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        pp.url = line.decode().strip()
    return pp


async def run_cli(args: Sequence[str], env: dict[str, str] | None = None,
                  timeout: float = 30) -> tuple[int, str, str]:
    """`python -m proxy ARGS` to its end, `env` added to this process's environment."""
    return await helpers.run_cli(args, {**os.environ, **(env or {})}, timeout)


@pytest.fixture
async def processes() -> AsyncIterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    for p in started:
        await p.stop(signal.SIGKILL)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"
