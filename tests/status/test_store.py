"""Status stores and `Workload`: atomic files, the lock, recovery, failures and claims."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from proxy.errors import NameInUse, StateError, UnsafePath
from proxy.status import model as st
from proxy.status.model import ConditionType as C
from proxy.status.model import WorkloadStatus as S
from proxy.status.store import CorruptRecord, FileStore, MemoryStore, list_records, pid_alive
from proxy.status.workload import Workload

TARGET = "https://example.com/mcp"


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=10)
    return proc.pid


def _unauthorized() -> st.SetCondition:
    return st.SetCondition(C.AUTHENTICATED, False, "UpstreamUnauthorized", "target answered 401")


async def test_file_is_private_and_atomic(tmp_path: Path) -> None:
    """The status file is 0600 in a 0700 directory, valid JSON, with no temp files left over."""
    store = FileStore(tmp_path, "w1")
    await store.claim(st.Started(pid=os.getpid(), target_url=TARGET))
    record = await store.update(st.Serving(proxy_url="http://127.0.0.1:1/mcp"))
    assert record.status is S.RUNNING
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    assert json.loads(store.path.read_text())["status"] == "running"
    assert sorted(p.name for p in store.directory.iterdir()) == ["w1.json", "w1.json.lock"]
    assert await store.read() == record


async def test_update_applies_to_what_the_file_holds(tmp_path: Path) -> None:
    """A second writer's condition survives this writer's next change (rule 9)."""
    mine, theirs = FileStore(tmp_path, "w"), FileStore(tmp_path, "w")
    await mine.claim(st.Started(pid=os.getpid(), target_url=TARGET))
    await mine.update(st.Serving())
    await theirs.update(_unauthorized())
    record = await mine.update(st.Serving())
    assert record.status is S.UNAUTHENTICATED


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b'{"hello": 1}', b"[]",
                                     b'{"name": "other", "status": "running",'
                                     b' "updated_at": "2026-11-22T02:10:00Z"}'])
async def test_corrupt_or_foreign_file_is_reported_once_and_replaced(
    tmp_path: Path, content: bytes
) -> None:
    """A damaged or foreign status file is warned about once, then replaced by a good one."""
    with capture_logs() as logs:
        store = FileStore(tmp_path, "w")
        store.directory.mkdir(parents=True)
        store.path.write_bytes(content)
        assert await store.read() is None
        assert await store.read() is None
        record = await store.update(st.Serving())
    warnings = [e for e in logs if e["event"] == "status_file_corrupt"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert record.name == "w"
    assert st.WorkloadRecord.from_dict(json.loads(store.path.read_text())) == record


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
async def test_write_failure_raises_state_error_and_keeps_the_file(
    tmp_path: Path, code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only or full disk surfaces as StateError, and the old file stays whole."""
    store = FileStore(tmp_path, "w")
    await store.update(st.Serving())
    before = store.path.read_bytes()

    def fail(data: bytes) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(store, "_write_bytes", fail)
    with pytest.raises(StateError, match=os.strerror(code)):
        await store.update(_unauthorized())
    assert store.path.read_bytes() == before


async def test_a_state_dir_that_is_no_directory_is_a_config_error(tmp_path: Path) -> None:
    """A state directory that is a file (or below one) gives a one-line error naming
    --state-dir, not a bare OSError."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UnsafePath, match=r"--state-dir: .* is not a directory"):
        await FileStore(blocker, "w").update(st.Serving())
    with pytest.raises(UnsafePath, match=r"--state-dir: .*below cannot be used"):
        await FileStore(blocker / "below", "w").update(st.Serving())


async def test_workload_keeps_going_when_writes_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a full disk the status moves on in memory, is logged once, and lands once it heals."""
    with capture_logs() as logs:
        store = FileStore(tmp_path, "w")
        workload = Workload(store)
        await workload.claim(st.Started(pid=os.getpid(), target_url=TARGET))
        real = store._write_bytes

        def full(data: bytes) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(store, "_write_bytes", full)
        record = await workload.apply(st.Serving())
        assert record.status is S.RUNNING
        future = workload.set_condition(C.AUTHENTICATED, False, "UpstreamUnauthorized", "401")
        assert future is not None
        assert (await future).status is S.UNAUTHENTICATED
        assert workload.record.status is S.UNAUTHENTICATED
        assert json.loads(store.path.read_text())["status"] == "starting"
        monkeypatch.setattr(store, "_write_bytes", real)
        await workload.apply(st.Serving())
    failures = [e for e in logs if e["event"] == "status_write_failed"]
    assert len(failures) == 1
    assert json.loads(store.path.read_text())["status"] == "running"  # file had no condition
    assert any(e["event"] == "status_write_recovered" for e in logs)


async def test_set_condition_writes_only_on_change() -> None:
    """Repeating a condition does no I/O; only a change of status or reason is written."""
    store = MemoryStore("w")
    workload = Workload(store)
    await workload.apply(st.Serving())
    assert workload.set_condition(C.REACHABLE, True, "ProbeAnswered", "ok") is not None
    assert workload.set_condition(C.REACHABLE, True, "ProbeAnswered", "ok again") is None
    await workload.flush()
    writes = store.writes
    for _ in range(100):
        assert workload.set_condition(C.REACHABLE, True, "ProbeAnswered", "ok") is None
    assert store.writes == writes
    assert workload.set_condition(C.REACHABLE, False, "ProbeFailed", "down") is not None
    await workload.flush()
    assert store.writes == writes + 1


async def test_queued_writes_land_in_order(tmp_path: Path) -> None:
    """Condition changes decided in a burst reach the file in the order they were decided."""
    store = FileStore(tmp_path, "w")
    workload = Workload(store)
    await workload.apply(st.Serving())
    futures = []
    for i in range(20):
        future = workload.set_condition(C.REACHABLE, i % 2 == 1, f"Step{i}", f"step {i}")
        assert future is not None
        futures.append(future)
    records = await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert [r.condition_map[C.REACHABLE].reason for r in records] == [
        f"Step{i}" for i in range(20)]
    assert (await store.read()) == workload.record == records[-1]


async def test_claim_refuses_a_live_owner_and_leaves_its_file(tmp_path: Path) -> None:
    """A second process cannot take a name a live process runs; the owner's file is untouched."""
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; sys.stdin.read()", stdin=subprocess.PIPE)
    try:
        store = FileStore(tmp_path, "w")
        await store.claim(st.Started(pid=owner.pid, target_url=TARGET))
        await store.update(_unauthorized())
        before = store.path.read_bytes()
        with pytest.raises(NameInUse) as info:
            await Workload(FileStore(tmp_path, "w")).claim(
                st.Started(pid=os.getpid(), target_url=TARGET))
        assert info.value.pid == owner.pid and str(owner.pid) in str(info.value)
        assert store.path.read_bytes() == before
    finally:
        await asyncio.wait_for(owner.communicate(b""), 10)


async def test_claim_takes_over_from_a_dead_or_stopped_owner(tmp_path: Path) -> None:
    """A name whose process died, or which stopped cleanly, is taken over with a fresh record."""
    store = FileStore(tmp_path, "w")
    await store.claim(st.Started(pid=_dead_pid(), target_url=TARGET))
    await store.update(_unauthorized())
    record = await store.claim(st.Started(pid=os.getpid(), target_url=TARGET))
    assert (record.pid, record.status, record.conditions) == (os.getpid(), S.STARTING, ())
    # Our own live pid, but stopped: free again.
    await store.update(st.Stopped())
    other = st.Started(pid=os.getpid() + 1_000_000, target_url=TARGET)
    assert (await store.claim(other)).pid == other.pid


async def test_memory_store_claims_like_the_file_store() -> None:
    """The in-memory store refuses a live owner just like the file store."""
    store = MemoryStore("w")
    await store.claim(st.Started(pid=os.getppid(), target_url=TARGET))
    with pytest.raises(NameInUse):
        await store.claim(st.Started(pid=os.getpid(), target_url=TARGET))


def test_pid_alive() -> None:
    """Our own process is alive; a reaped child and nonsense pids are not."""
    assert pid_alive(os.getpid())
    assert not pid_alive(_dead_pid())
    assert not pid_alive(0) and not pid_alive(-1) and not pid_alive(None)


def test_pid_alive_counts_a_zombie_as_gone() -> None:
    """A child that exited but was not yet reaped does not hold its name."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        if Path("/proc").is_dir():
            assert not pid_alive(proc.pid)
    finally:
        proc.wait(timeout=10)


async def test_list_records_reports_corrupt_files(tmp_path: Path) -> None:
    """The status command sees every workload, a damaged file as a corrupt entry."""
    await FileStore(tmp_path, "b").update(st.Serving())
    await FileStore(tmp_path, "a").update(st.Serving())
    await FileStore(tmp_path, "a").update(_unauthorized())
    (tmp_path / "workloads" / "c.json").write_text("{oops")
    entries = list_records(tmp_path)
    assert [getattr(e, "name", None) for e in entries] == ["a", "b", "c"]
    assert isinstance(entries[2], CorruptRecord)
    assert not isinstance(entries[0], CorruptRecord)
    assert entries[0].status is S.UNAUTHENTICATED
    assert list_records(tmp_path / "nowhere") == []
