"""`mcp-authproxy status`, `mcp-authproxy demo` and `examples/runner.py`, run as users run them."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.status import model as st

from .conftest import run_cli
from helpers import LONG_WAIT, SLOW_WAIT, WAIT, UpstreamFactory, eventually, write_secret

ROOT = Path(__file__).resolve().parents[2]


def _write(state_dir: Path, record: st.WorkloadRecord) -> None:
    folder = state_dir / "workloads"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{record.name}.json").write_text(json.dumps(record.to_dict()))


def _record(name: str, pid: int, *, unauth: bool = False) -> st.WorkloadRecord:
    r = st.apply(None, st.Started(pid=pid, target_url="https://example.com/mcp",
                                  proxy_url="http://127.0.0.1:8080/mcp"), name=name)
    r = st.apply(r, st.Serving(), name=name)
    if unauth:
        r = st.apply(r, st.SetCondition(st.ConditionType.AUTHENTICATED, False,
                                        "UpstreamUnauthorized", "target answered 401 "
                                        "(invalid_token: The access token expired)"), name=name)
    return r


async def test_status_table_lists_every_workload_with_status_and_reason(tmp_path: Path) -> None:
    """The table shows each workload's name, status, reason and proxy URL."""
    _write(tmp_path, _record("alpha", os.getpid()))
    _write(tmp_path, _record("beta", os.getpid(), unauth=True))
    code, out, _ = await run_cli(["status", "--state-dir", str(tmp_path)])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "STATUS", "SINCE", "REASON"]
    alpha = next(line for line in lines if line.startswith("alpha"))
    beta = next(line for line in lines if line.startswith("beta"))
    assert "running" in alpha and "http://127.0.0.1:8080/mcp" in alpha
    assert "unauthenticated" in beta and "UpstreamUnauthorized" in beta


async def test_status_json_prints_the_file_contents(tmp_path: Path) -> None:
    """--json gives the status file's object for one name and an array for all."""
    record = _record("alpha", os.getpid(), unauth=True)
    _write(tmp_path, record)
    code, out, _ = await run_cli(["status", "alpha", "--json", "--state-dir", str(tmp_path)])
    assert code == 0
    assert json.loads(out) == record.to_dict()
    code, out, _ = await run_cli(["status", "--json", "--state-dir", str(tmp_path)])
    assert code == 0 and json.loads(out) == [record.to_dict()]


async def test_status_of_a_dead_process_is_not_shown_as_running(tmp_path: Path) -> None:
    """A workload whose process died is shown as gone, not as its last status."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()
    _write(tmp_path, _record("ghost", proc.pid))
    code, out, _ = await run_cli(["status", "ghost", "--state-dir", str(tmp_path)])
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("ghost"))
    assert "gone" in row


async def test_status_of_an_unknown_name_exits_1(tmp_path: Path) -> None:
    """Asking for a workload that does not exist exits 1 with a one-line error."""
    code, out, err = await run_cli(["status", "nobody", "--state-dir", str(tmp_path)])
    assert code == 1 and out == "" and "nobody" in err


async def test_demo_walks_through_revocation_and_restoration() -> None:
    """The demo prints each status change and ends by itself with exit 0."""
    code, out, err = await run_cli(["demo"], timeout=60)
    assert code == 0, out + err
    transitions = [line.split("status -> ")[1].split()[0] for line in out.splitlines()
                   if "status -> " in line]
    assert transitions[:3] == ["running", "unauthenticated", "running"] or (
        transitions == ["running", "unauthenticated", "running"]
    ), out
    assert out.count("callback on_unauthorized") == 1
    assert "demo OK" in out


async def test_runner_example_keeps_unauthenticated_despite_set_running(
    tmp_path: Path, make_upstream: UpstreamFactory
) -> None:
    """The runner calls set_running() in a loop, yet a 401 episode shows until proof."""
    accepted = {"token": "good-token"}

    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {accepted['token']}":
            return web.json_response({}, status=401, headers={
                "WWW-Authenticate": 'Bearer error="invalid_token"'})
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})

    upstream = await make_upstream(handler)
    token = write_secret(tmp_path / "token", "good-token")
    state = tmp_path / "state"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "examples" / "runner.py"),
        "--target-url", str(upstream.make_url("/mcp")), "--bearer-token-file", str(token),
        "--name", "runner", "--state-dir", str(state), "--health-interval", "0",
        "--tick", "0.05", "--seconds", "30",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    path = state / "workloads" / "runner.json"

    async def wait_status(want: str) -> dict[str, object]:
        def read() -> dict[str, object] | None:
            data: dict[str, object] = json.loads(path.read_text())
            return data if data["status"] == want else None

        return await eventually(read, SLOW_WAIT, what=f"status {want}", every=0.05)

    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        async with aiohttp.ClientSession() as client:
            async with client.post(url, json={}) as resp:
                assert resp.status == 200
            await wait_status("running")
            accepted["token"] = "rotated"
            async with client.post(url, json={}) as resp:
                assert resp.status == 503  # upstream_unauthorized: the proxy owns the token
            data = await wait_status("unauthenticated")
            assert "invalid_token" in str(data["message"])
            # Each set_running() rewrites the file (atomic rename, so a new inode and
            # mtime): after five rewrites, every version read still says unauthenticated.
            def version() -> tuple[int, int]:
                st_ = path.stat()
                return st_.st_ino, st_.st_mtime_ns

            seen = {version()}

            def rewritten_five_times() -> bool:
                seen.add(version())
                assert json.loads(path.read_text())["status"] == "unauthenticated"
                return len(seen) > 5

            # the runner ticks every 0.05 s
            await eventually(rewritten_five_times, WAIT, what="the runner calling set_running()")
            token.write_text("rotated")

            async def served() -> bool:
                async with client.post(url, json={}) as resp:
                    return resp.status == 200

            await eventually(served, LONG_WAIT, what="a call to succeed", every=0.05)
            await wait_status("running")
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    text = err.decode()
    assert text.count("is unauthenticated") == 1 and "write a fresh token" in text
    assert json.loads(path.read_text())["status"] == "stopped"
