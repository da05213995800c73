"""Status stores: where a workload's record lives — in memory, or in its status file.

`FileStore` keeps `<state-dir>/workloads/<name>.json` (mode 0600, directory 0700).
Every change is read-derive-write under a cross-process lock (`<name>.json.lock`,
filelock), from what the file holds (contract rule 9), and lands by atomic replace, so
no reader ever sees half a file and no writer undoes another's condition. Blocking I/O
runs in a worker thread so the event loop never waits on the disk.

A store must never crash on what it finds: a corrupt or foreign file (a FIFO or a link
planted in its place included) is reported once and replaced. It never follows a link
out of the state directory or blocks on a file, and refuses (`UnsafePath`) a state
directory others could write (`safe_fs`). I/O failures surface as `StateError`
(translated at one boundary), never as a bare OSError. A store never holds or writes a
credential: records carry none.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import filelock

from ..errors import NameInUse, StateError
from ..log import get_logger, mask_known_secrets
from ..safe_fs import (
    NotRegularFile,
    check_owned_dir,
    ensure_private_dir,
    is_regular_or_missing,
    read_regular,
    write_atomically,
)
from ..status import model as st

MAX_FILE_BYTES = 1024 * 1024  # a status file is a few hundred bytes; more is foreign
LOCK_TIMEOUT = 10.0  # seconds; a holder only ever does one small read and write
LOCK_POLL = 0.002  # filelock polls a held lock; writes take ~1 ms, so poll at that pace
_ENDED = (st.Lifecycle.STOPPED, st.Lifecycle.FAILED)


class StatusStore(Protocol):
    name: str

    async def read(self) -> st.WorkloadRecord | None:
        """The record as stored now; None when there is none (or it was unreadable)."""

    async def update(self, event: st.Event) -> st.WorkloadRecord:
        """Apply `event` to what the store holds, under the lock; return the new record."""

    async def claim(self, started: st.Started) -> st.WorkloadRecord:
        """Take the name for a new run; `NameInUse` when a live process holds it."""


@dataclass(frozen=True, slots=True)
class CorruptRecord:
    """A status file that could not be read as a record (for `mcp-authproxy status`)."""

    name: str
    path: Path
    problem: str


def pid_alive(pid: int | None) -> bool:
    """Is `pid` a running process (a zombie counts as gone)?"""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): kill(0) is all we know
    # The state letter follows the parenthesised command name, which may hold spaces.
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _claim_conflict(existing: st.WorkloadRecord | None, started: st.Started) -> int | None:
    """The other live pid that owns the name, or None when it may be taken."""
    if existing is None or existing.pid is None or existing.pid == started.pid:
        return None
    if existing.lifecycle in _ENDED or not pid_alive(existing.pid):
        return None
    return existing.pid


def _check_name(record: st.WorkloadRecord, name: str) -> st.WorkloadRecord:
    if record.name != name:
        raise ValueError(f"record names workload {record.name!r}")
    return record


def decode(data: bytes, name: str) -> st.WorkloadRecord:
    """Parse a status file's bytes; ValueError (with a short reason) when it is not one."""
    if len(data) > MAX_FILE_BYTES:
        raise ValueError("file too large")
    try:
        obj: Any = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({type(exc).__name__})") from None
    try:
        return _check_name(st.WorkloadRecord.from_dict(obj), name)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a status record ({type(exc).__name__}: {exc})") from None


def encode(record: st.WorkloadRecord) -> bytes:
    return (json.dumps(record.to_dict(), indent=2) + "\n").encode("utf-8")


def scrub(event: st.Event) -> st.Event:
    """The event with any credential in use masked out of its message.

    Messages quote the target (a 401's error_description), and a careless target may
    quote the token it was sent: it must not reach a status file or `/status`.
    """
    if isinstance(event, st.SetCondition | st.Failed):
        clean = mask_known_secrets(event.message)
        if clean != event.message:
            return dataclasses.replace(event, message=clean)
    return event


class MemoryStore:
    """A store with no file: for tests and for embedding without a state directory."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.record: st.WorkloadRecord | None = None
        self.writes = 0  # how many updates landed; tests count I/O with it

    async def read(self) -> st.WorkloadRecord | None:
        return self.record

    async def update(self, event: st.Event) -> st.WorkloadRecord:
        self.record = st.apply(self.record, scrub(event), name=self.name)
        self.writes += 1
        return self.record

    async def claim(self, started: st.Started) -> st.WorkloadRecord:
        other = _claim_conflict(self.record, started)
        if other is not None:
            raise NameInUse(self.name, other)
        return await self.update(started)


class FileStore:
    """One workload's status file, shared safely by any number of processes."""

    def __init__(self, state_dir: Path | str, name: str, *, flag: str = "--state-dir") -> None:
        self.name = name
        self.state_dir = Path(state_dir)
        self.flag = flag  # names the option in an `UnsafePath` message
        self.directory = self.state_dir / "workloads"
        self.path = self.directory / f"{name}.json"
        self.lock_path = self.directory / f"{name}.json.lock"
        self._logger = get_logger().bind(workload=name)
        self._reported: set[tuple[int, int, int]] = set()  # corrupt files already reported

    # --- async interface: every blocking call goes to a thread ------------------------

    async def read(self) -> st.WorkloadRecord | None:
        return await asyncio.to_thread(self.read_sync)

    async def update(self, event: st.Event) -> st.WorkloadRecord:
        return await asyncio.to_thread(self.update_sync, event)

    async def claim(self, started: st.Started) -> st.WorkloadRecord:
        return await asyncio.to_thread(self.claim_sync, started)

    # --- sync implementation (also handy for a second process in tests) ---------------

    def read_sync(self) -> st.WorkloadRecord | None:
        try:
            if not check_owned_dir(self.state_dir, flag=self.flag) or not ensure_private_dir(
                    self.directory, flag=self.flag, create=False):
                return None
            return self._load()
        except OSError as exc:
            raise StateError(f"cannot read status file {self.path}: {exc.strerror}") from exc

    def update_sync(self, event: st.Event) -> st.WorkloadRecord:
        with self._locked():
            record = st.apply(self._load(), scrub(event), name=self.name)
            self._store(record)
            return record

    def claim_sync(self, started: st.Started) -> st.WorkloadRecord:
        with self._locked():
            existing = self._load()
            other = _claim_conflict(existing, started)
            if other is not None:
                raise NameInUse(self.name, other)  # and the live workload's file is untouched
            record = st.apply(existing, started, name=self.name)
            self._store(record)
            return record

    # --- the I/O boundary -------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The cross-process lock; OSError and lock timeouts become StateError."""
        try:
            self._ensure_directory()
            lock = filelock.FileLock(self.lock_path, timeout=LOCK_TIMEOUT, mode=0o600,
                                     poll_interval=LOCK_POLL)
            lock.acquire()
        except filelock.Timeout as exc:
            raise StateError(f"status file {self.path} stayed locked for "
                             f"{LOCK_TIMEOUT:g} s") from exc
        except OSError as exc:
            raise StateError(f"cannot lock status file {self.path}: {exc.strerror}") from exc
        try:
            yield
        except OSError as exc:
            raise StateError(f"cannot write status file {self.path}: {exc.strerror}") from exc
        finally:
            lock.release()

    def _ensure_directory(self) -> None:
        """The state dir is the user's own and `workloads/` a real 0700 directory in it
        (`UnsafePath` otherwise); a lock path taken by anything but a file is cleared."""
        if not check_owned_dir(self.state_dir, flag=self.flag):
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            check_owned_dir(self.state_dir, flag=self.flag)
        ensure_private_dir(self.directory, flag=self.flag)
        if not is_regular_or_missing(self.lock_path):
            # filelock would open it following a link (and truncate what it points to).
            os.unlink(self.lock_path)

    def _read_bytes(self) -> bytes | None:
        return read_regular(self.path, MAX_FILE_BYTES)

    def _write_bytes(self, data: bytes) -> None:
        write_atomically(self.path, data)

    def _load(self) -> st.WorkloadRecord | None:
        try:
            data = self._read_bytes()
        except NotRegularFile as exc:
            self._report_corrupt(f"{exc.kind}, not a regular file")
            return None  # the next write replaces it (the rename replaces the entry itself)
        if data is None:
            return None
        try:
            return decode(data, self.name)
        except ValueError as exc:
            self._report_corrupt(str(exc))
            return None  # the next write replaces it

    def _store(self, record: st.WorkloadRecord) -> None:
        self._write_bytes(encode(record))

    def _report_corrupt(self, problem: str) -> None:
        try:
            s = self.path.lstat()
            key = (s.st_ino, s.st_mtime_ns, s.st_size)
        except OSError:
            key = (0, 0, 0)
        if key in self._reported:
            return
        self._reported.add(key)
        self._logger.warning("status_file_corrupt", path=str(self.path), problem=problem,
                             action="replaced on the next write")


def list_records(state_dir: Path | str, *, flag: str = "--state-dir"
                 ) -> list[st.WorkloadRecord | CorruptRecord]:
    """Every status file under `state_dir`, sorted by name; unreadable ones as CorruptRecord.

    Raises `UnsafePath` for a state directory others could write, or a `workloads` link.
    """
    folder = Path(state_dir) / "workloads"
    if not check_owned_dir(Path(state_dir), flag=flag) or not ensure_private_dir(
            folder, flag=flag, create=False):
        return []
    try:
        paths = sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))
    except OSError:
        return []
    out: list[st.WorkloadRecord | CorruptRecord] = []
    for path in paths:
        name = path.name.removesuffix(".json")
        try:
            data = read_regular(path, MAX_FILE_BYTES)
            if data is None:
                continue  # removed meanwhile
            out.append(decode(data, name))
        except (OSError, ValueError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) else str(exc)
            out.append(CorruptRecord(name=name, path=path, problem=str(problem)))
    return out
