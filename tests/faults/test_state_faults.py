"""State-directory faults while the proxy runs: a full disk, a read-only directory and a
corrupt status file are reported once, and forwarding never stops.

CI runs as root (permissions do not stop root), so the faults are injected at the
store's one I/O boundary, `FileStore._write_bytes`.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from proxy.app import AuthProxy
from proxy.config import ProxyConfig
from proxy.status.store import FileStore

from helpers import WAIT, UpstreamFactory, answering


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
async def test_status_writes_failing_are_reported_once_and_forwarding_goes_on(
    make_upstream: UpstreamFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """With a full disk or read-only state dir, clients are served and the callback still fires."""
    authorized = True

    async def target(request: web.Request) -> web.Response:
        if authorized:
            return web.Response(text="ok")
        challenge = 'Bearer error="invalid_token"'
        return web.Response(status=401, headers={"WWW-Authenticate": challenge})

    upstream = await make_upstream(target)
    token = tmp_path / "token"
    token.write_text("tok")
    events: list[Any] = []
    config = ProxyConfig(target_url=str(upstream.make_url("/mcp")), state_dir=tmp_path / "s",
                         bearer_token_file=token, health_interval=0, drain_timeout=0.5)
    with capture_logs() as logs:
        async with AuthProxy(config, on_unauthorized=events.append) as proxy:
            status_file = config.state_path / "workloads" / f"{config.workload}.json"
            before = status_file.read_bytes()

            def broken(self: FileStore, data: bytes) -> None:
                raise OSError(code, os.strerror(code))

            monkeypatch.setattr(FileStore, "_write_bytes", broken)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as s:
                for i in range(30):
                    authorized = i % 10 < 5
                    async with s.post(proxy.url, data=b"{}") as resp:
                        assert resp.status == (200 if authorized else 503)
                await proxy.monitor.flush()
            assert proxy.status.status in ("running", "unauthenticated")
            assert status_file.read_bytes() == before  # old content, never half-written
            monkeypatch.undo()
    failures = [e for e in logs if e["event"] == "status_write_failed"]
    assert len(failures) == 1
    assert len(events) == 3  # one callback per episode, file or no file
    assert json.loads(status_file.read_text())["status"] == "stopped"  # healed before exit


async def test_a_status_file_corrupted_while_running_is_reported_once_and_replaced(
    make_upstream: UpstreamFactory, tmp_path: Path
) -> None:
    """Someone scribbling over the status file does not stop the proxy; it is rewritten."""
    upstream = await make_upstream(answering("ok"))
    config = ProxyConfig(target_url=str(upstream.make_url("/mcp")), state_dir=tmp_path / "s",
                         health_interval=0, drain_timeout=0.5)
    with capture_logs() as logs:
        async with AuthProxy(config) as proxy:
            status_file = config.state_path / "workloads" / f"{config.workload}.json"
            status_file.write_bytes(b'{"name": "half a fi')
            async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as s,
                        s.get(proxy.url) as resp):
                assert resp.status == 200
            await proxy.set_running()
            await proxy.set_running()
            assert json.loads(status_file.read_text())["status"] == "running"
    assert json.loads(status_file.read_text())["status"] == "stopped"
    assert len([e for e in logs if e["event"] == "status_file_corrupt"]) == 1
