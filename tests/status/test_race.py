"""Two OS processes racing on one status file: no lost update, no half-written file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.status import model as st
from proxy.status.store import FileStore

SERVING_WRITES = 1000
TOGGLES = 200

# Runs in a child process. "serving" says Serving N times, like a runner that keeps
# calling set_running; "episode" flips Reachable N times and opens an episode halfway.
RACER = r"""
import sys
from pathlib import Path
from proxy.status import model as st
from proxy.status.store import FileStore

role, state_dir, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
store = FileStore(state_dir, "race")
print("ready", flush=True)
sys.stdin.readline()
after_episode = 0
for i in range(count):
    if role == "serving":
        record = store.update_sync(st.Serving())
        opened = record.condition(st.ConditionType.AUTHENTICATED)
        if opened is not None and not opened.status:
            after_episode += 1
            assert record.status is st.WorkloadStatus.UNAUTHENTICATED, record
        if i == 50:
            print("warm", flush=True)
    else:
        store.update_sync(st.SetCondition(st.ConditionType.REACHABLE, i % 2 == 1,
                                          f"Toggle{i}", "toggle"))
        if i == count // 2:
            store.update_sync(st.SetCondition(st.ConditionType.AUTHENTICATED, False,
                                              "UpstreamUnauthorized", "target answered 401"))
print(f"done {after_episode}", flush=True)
"""


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs directory when there is one: the race is about locking, not fsync speed."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        folder = Path(tempfile.mkdtemp(prefix="mcp-authproxy-race-", dir=shm))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        yield tmp_path


def _spawn(script: Path, role: str, state_dir: Path, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script), role, str(state_dir), str(count)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


def _expect_line(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(prefix), f"racer said {line!r}, expected {prefix!r}"
    return line


def test_two_processes_never_show_running_mid_episode(tmp_path: Path, state_dir: Path) -> None:
    """A runner hammering "running" from another process never hides an open episode."""
    store = FileStore(state_dir, "race")
    store.claim_sync(st.Started(pid=os.getpid(), target_url="https://example.com/mcp"))
    store.update_sync(st.Serving())
    script = tmp_path / "racer.py"
    script.write_text(RACER)

    stop = threading.Event()
    seen: list[dict[str, object]] = []
    bad: list[bytes] = []

    def poll() -> None:
        # Every read must be one whole JSON document: replace is atomic.
        while not stop.is_set():
            data = store.path.read_bytes()
            try:
                seen.append(json.loads(data))
            except ValueError:
                bad.append(data)

    reader = threading.Thread(target=poll, daemon=True)
    serving = _spawn(script, "serving", state_dir, SERVING_WRITES)
    episode = _spawn(script, "episode", state_dir, TOGGLES)
    try:
        _expect_line(serving, "ready")
        _expect_line(episode, "ready")
        reader.start()
        assert serving.stdin is not None and episode.stdin is not None
        serving.stdin.write("go\n")
        serving.stdin.flush()
        _expect_line(serving, "warm")  # the runner is mid-stream when the episode opens
        episode.stdin.write("go\n")
        episode.stdin.flush()
        _expect_line(episode, "done")
        serving_done = _expect_line(serving, "done")
        assert serving.wait(timeout=30) == 0 and episode.wait(timeout=30) == 0
    finally:
        stop.set()
        for proc in (serving, episode):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        reader.join(timeout=10)

    assert bad == [] and len(seen) > 0
    assert int(serving_done.split()[1]) > 0, "the runner wrote nothing after the episode opened"
    statuses = [doc["status"] for doc in seen]
    if "unauthenticated" in statuses:
        after = statuses[statuses.index("unauthenticated"):]
        assert set(after) == {"unauthenticated"}, "running shown before any proof"
    final = store.read_sync()
    assert final is not None
    assert final.status is st.WorkloadStatus.UNAUTHENTICATED
    assert final.lifecycle is st.Lifecycle.SERVING
    reachable = final.condition(st.ConditionType.REACHABLE)
    assert reachable is not None and reachable.reason == f"Toggle{TOGGLES - 1}"  # none lost
