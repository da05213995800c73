"""A state directory someone else can write into cannot be turned against the proxy.

A FIFO planted as a status file must not block start-up or `status`; a `workloads`
symlink must not make the proxy chmod or write through it; a state directory owned by
another user or writable by others is refused with one line naming `--state-dir`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ProxyProcess, run_cli, start_proxy
from helpers import SLOW_WAIT as WAIT

TARGET = "http://127.0.0.1:9/mcp"
NOBODY = 65534


def run_args(state_dir: Path, *extra: str) -> list[str]:
    return ["run", "--target-url", TARGET, "--name", "w", "--state-dir", str(state_dir),
            "--health-interval", "0", "--log-format", "json", *extra]


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def symlinked_workloads(state_dir: Path, elsewhere: Path) -> None:
    elsewhere.mkdir()
    elsewhere.chmod(0o755)
    state_dir.mkdir(mode=0o700)
    (state_dir / "workloads").symlink_to(elsewhere)


def unsafe_state_dir(state_dir: Path, how: str) -> None:
    state_dir.mkdir(mode=0o700)
    if how == "foreign_owner":
        os.chown(state_dir, NOBODY, NOBODY)
    else:
        state_dir.chmod(0o777 if how == "world_writable" else 0o770)


def one_line_naming_state_dir(stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "--state-dir" in lines[0] and "Traceback" not in stderr


async def test_a_fifo_planted_as_the_status_file_blocks_neither_start_nor_status(
    state_dir: Path, processes: list[ProxyProcess]
) -> None:
    """With a FIFO at `workloads/<name>.json`, the proxy starts, replaces it with a real
    status file and stops on SIGTERM; `status` answers at once."""
    (state_dir / "workloads").mkdir(parents=True, mode=0o700)
    fifo = state_dir / "workloads" / "w.json"
    os.mkfifo(fifo, 0o600)
    for args in (["status", "--state-dir", str(state_dir)],
                 ["status", "w", "--state-dir", str(state_dir)],
                 ["status", "--json", "--state-dir", str(state_dir)]):
        code, out, _ = await run_cli(args, timeout=WAIT)
        assert code in (0, 1), args
    proxy = await start_proxy(run_args(state_dir), wait_url=False)
    processes.append(proxy)
    assert proxy.proc.stdout is not None
    line = await asyncio.wait_for(proxy.proc.stdout.readline(), WAIT)
    assert line.decode().startswith("http://127.0.0.1:")
    assert stat.S_ISREG(os.lstat(fifo).st_mode)  # the FIFO was replaced, never read
    code, out, _ = await run_cli(["status", "w", "--state-dir", str(state_dir)], timeout=WAIT)
    assert code == 0 and "running" in out
    assert await proxy.stop(signal.SIGTERM, timeout=WAIT) == 0


async def test_a_symlinked_workloads_dir_is_refused_and_never_written_through(
    state_dir: Path, tmp_path: Path
) -> None:
    """A `workloads` link to another directory makes `run` and `status` exit 2 with one
    line; the link's target keeps its mode and gets no file."""
    elsewhere = tmp_path / "elsewhere"
    symlinked_workloads(state_dir, elsewhere)
    code, _, err = await run_cli(run_args(state_dir), timeout=WAIT)
    assert code == 2
    one_line_naming_state_dir(err)
    assert "symbolic link" in err
    code, _, err = await run_cli(["status", "--state-dir", str(state_dir)], timeout=WAIT)
    assert code == 2
    one_line_naming_state_dir(err)
    assert stat.S_IMODE(os.stat(elsewhere).st_mode) == 0o755
    assert entries(elsewhere) == []


@pytest.mark.parametrize("make_unsafe", ["foreign_owner", "world_writable", "group_writable"])
async def test_a_state_dir_others_can_write_is_refused(
    state_dir: Path, make_unsafe: str
) -> None:
    """A state dir owned by another user, or writable by group or others, makes `run`
    and `status` exit 2 with one line naming --state-dir, and nothing is written."""
    unsafe_state_dir(state_dir, make_unsafe)
    code, out, err = await run_cli(run_args(state_dir), timeout=WAIT)
    assert (code, out) == (2, "")
    one_line_naming_state_dir(err)
    assert entries(state_dir) == []
    code, out, err = await run_cli(["status", "--state-dir", str(state_dir)], timeout=WAIT)
    assert (code, out) == (2, "")
    one_line_naming_state_dir(err)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory another user can reach (pytest's own tmp dirs are root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="mcp-authproxy-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def as_nobody(*argv: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


@pytest.fixture
def nobody_dirs(shared_tmp: Path) -> tuple[Path, Path]:
    """(a state dir root owns, a state dir nobody owns that everybody can write)."""
    probe = subprocess.run(as_nobody(sys.executable, "-c", "import proxy"),
                           capture_output=True, timeout=WAIT, check=False)
    if probe.returncode != 0:
        pytest.skip("this Python cannot be run by another user here")
    foreign = shared_tmp / "root-owned"
    foreign.mkdir(mode=0o755)
    own = shared_tmp / "own-but-open"
    own.mkdir()
    os.chown(own, NOBODY, NOBODY)
    own.chmod(0o777)
    return foreign, own


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv (util-linux) to run as another user")
async def test_a_non_root_user_refuses_a_state_dir_root_owns(
    nobody_dirs: tuple[Path, Path], shared_tmp: Path
) -> None:
    """Run as an ordinary user (nobody), the proxy refuses a state directory that
    belongs to root, and one of its own that everybody can write, rather than run."""
    foreign, own = nobody_dirs
    env = {**os.environ, "HOME": str(shared_tmp)}
    for state_dir, words in ((foreign, "owned by uid 0"), (own, "writable by group or others")):
        proc = await asyncio.create_subprocess_exec(
            *as_nobody(sys.executable, "-m", "proxy", *run_args(state_dir)),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), WAIT)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 2, err
        one_line_naming_state_dir(err.decode())
        assert words in err.decode()
        assert entries(state_dir) == []
