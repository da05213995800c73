"""Directories and files only this user can change: checked before use, opened without
following links and without blocking.

The state directory (status files) and the sign-in's `credentials/` directory hold what
other processes trust (`status` output, tokens). Someone who can write into them could
plant a FIFO that blocks every reader, a symlink that redirects a `chmod` or a write
(as root: anywhere), or a record of their own. So:

- a directory the user named (`--state-dir`) must be a directory owned by this user and
  not writable by group or others (`check_owned_dir`); a link to one is fine, the user
  gave it;
- a directory we keep inside it (`workloads/`, `credentials/`) must not be a link at all;
  it is created 0700 and tightened to 0700 through its own descriptor, never through a
  path a link could redirect (`ensure_private_dir`);
- a file is opened with `O_NOFOLLOW | O_NONBLOCK` and must be a regular file
  (`read_regular`); a private one (a sign-in's tokens) also owned by the user with mode
  0600;
- a file is replaced atomically (`write_atomically`): a 0600 temp file beside it, fsync,
  rename; a reader sees the old contents or the new, never a part.

Failures of the first two are `UnsafePath` (a `ConfigError`: exit 2, one line naming the
flag); a file that is not a regular one is `NotRegularFile` (an `OSError`), which a
store treats like a corrupt file. Nothing here reads or logs a file's contents.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from .errors import UnsafePath

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NOCTTY = getattr(os, "O_NOCTTY", 0)
_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC | _NOCTTY


class NotRegularFile(OSError):
    """A path that should hold a regular file holds a link, FIFO, socket or device."""

    def __init__(self, path: Path | str, kind: str) -> None:
        super().__init__(errno.EINVAL, f"not a regular file ({kind})", str(path))
        self.kind = kind


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a regular file"


def _check_owner(info: os.stat_result, path: Path, flag: str) -> None:
    uid = os.geteuid()
    if info.st_uid != uid:
        raise UnsafePath(f"{flag}: {path} is owned by uid {info.st_uid}, not by this user "
                         f"(uid {uid}); others could rewrite what it holds")


def check_owned_dir(path: Path, *, flag: str) -> bool:
    """Refuse (`UnsafePath`) a directory not owned by this user or writable by group or
    others; False when it does not exist (yet)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise UnsafePath(f"{flag}: {path} cannot be used: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(f"{flag}: {path} is not a directory")
    _check_owner(info, path, flag)
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePath(f"{flag}: {path} is writable by group or others "
                         f"(mode {stat.S_IMODE(info.st_mode):o}); run chmod go-w {path}")
    return True


def ensure_private_dir(path: Path, *, flag: str, create: bool = True) -> bool:
    """Make sure `path` is this user's own 0700 directory and not a link (`UnsafePath`
    otherwise); created when missing and `create`. False when missing and not created.

    The mode is tightened through the directory's own descriptor, opened without
    following links: a link planted in its place is refused, never chmod-ed through.
    """
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise UnsafePath(f"{flag}: cannot create {path}: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except FileNotFoundError:
        if create:
            raise UnsafePath(f"{flag}: {path} vanished while being created") from None
        return False
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            try:
                kind = _kind(os.lstat(path).st_mode)
            except OSError:
                kind = "not a directory"
            raise UnsafePath(f"{flag}: {path} is {kind}, not a directory; refusing to use "
                             "it") from None
        raise UnsafePath(f"{flag}: {path} cannot be used: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        _check_owner(info, path, flag)
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return True


def read_regular(path: Path, limit: int, *, private: str | None = None) -> bytes | None:
    """Up to `limit` + 1 bytes of the regular file at `path`; None when it is missing.

    Opened without following a link and without blocking (a FIFO would otherwise hang
    the reader until someone writes to it); anything but a regular file raises
    `NotRegularFile`. With `private` (the flag naming it), the file must also be owned
    by this user with mode 0600, else `UnsafePath`.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile(path, "a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(path, _kind(info.st_mode))
        if private is not None:
            _check_owner(info, path, private)
            mode = stat.S_IMODE(info.st_mode)
            if mode != 0o600:
                raise UnsafePath(f"{private}: {path} has mode {mode:04o}; it must be 0600 "
                                 f"(run chmod 600 {path})")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def is_regular_or_missing(path: Path) -> bool:
    """True when `path` is absent or a regular file (not a link, FIFO or the like)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return True


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: a 0600 temp file in the same directory, fsync, rename.

    The rename replaces the directory entry itself (a link planted there is replaced,
    never written through). The directory is then fsync'ed where it can be opened, so
    the rename survives a crash too.
    """
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
