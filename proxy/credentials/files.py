"""Secret files: read one checked value, and notice when the file may have changed.

Used by the bearer file source and the OAuth sources. File reads are small and
synchronous on purpose: a secret file is a few bytes on a local disk, and a stat per
second does not stall the event loop. Nothing here logs a file's contents.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..log import get_logger

WATCH_INTERVAL = 1.0  # seconds between checks of a watched file (contract: at most 1 s)
# A file modified this recently may change again within the file system's timestamp
# granularity without its signature changing (git's "racy clean" problem): re-read it.
_RACY_NS = 2_000_000_000
_MAX_SECRET_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class FileSignature:
    """What tells a changed file apart: an in-place rewrite or an atomic rename."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    mode: int


def file_signature(path: Path) -> FileSignature | None:
    """The file's signature, None when it cannot be stat'ed (missing, bad directory)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileSignature(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)


@dataclass(frozen=True, slots=True)
class SecretRead:
    """One read of a file holding a secret: the stripped text, or why there is none."""

    text: str | None = field(repr=False)
    reason: str  # "TokenLoaded" or TokenFileMissing / TokenFileEmpty / TokenFileUnreadable
    message: str  # names the file, never its contents
    signature: FileSignature | None


def check_secret_text(raw: bytes, *, spaces: bool = False) -> tuple[str | None, str]:
    """Pure: the stripped secret in `raw`, or (None, failure reason).

    A bearer token ends up in a header, so it must be one run of visible ASCII
    characters: anything else would let a stray newline inject headers. OAuth client
    secrets and refresh tokens are VSCHAR (RFC 6749 Appendix A), spaces allowed.
    """
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return None, "TokenFileInvalid"
    if not text:
        return None, "TokenFileEmpty"
    lowest = 0x20 if spaces else 0x21
    if not all(lowest <= ord(c) <= 0x7E for c in text):
        return None, "TokenFileInvalid"
    return text, "TokenLoaded"


_PROBLEMS = {
    "TokenFileEmpty": "is empty",
    "TokenFileInvalid": "must hold one value of visible ASCII characters on one line",
}


def read_secret_file(path: Path, what: str = "token file", *, spaces: bool = False
                     ) -> SecretRead:
    """Read and check a secret file; every failure becomes a reason and a message."""
    signature = file_signature(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_SECRET_BYTES + 1)
    except FileNotFoundError:
        return SecretRead(None, "TokenFileMissing", f"{what} {path} does not exist", None)
    except OSError as exc:
        problem = exc.strerror or type(exc).__name__
        return SecretRead(
            None, "TokenFileUnreadable", f"{what} {path} cannot be read: {problem}", signature
        )
    if len(raw) > _MAX_SECRET_BYTES:
        return SecretRead(None, "TokenFileInvalid", f"{what} {path} is too large", signature)
    text, reason = check_secret_text(raw, spaces=spaces)
    if text is None:
        return SecretRead(None, reason, f"{what} {path} {_PROBLEMS[reason]}", signature)
    return SecretRead(text, reason, f"{what} {path} loaded", signature)


class FileWatch:
    """Remembers a file's signature and says when it may have changed since."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: FileSignature | None = None
        self._seen = False

    @property
    def signature(self) -> FileSignature | None:
        """The signature last marked (None before any, or when the file was missing)."""
        return self._signature

    def mark(self, signature: FileSignature | None) -> None:
        self._signature = signature
        self._seen = True

    def changed(self) -> bool:
        signature = file_signature(self.path)
        if not self._seen or signature != self._signature:
            return True
        # Same signature, but written so recently that a second write may hide in the
        # same timestamp tick: report a possible change; the caller compares contents.
        return signature is not None and time.time_ns() - signature.mtime_ns < _RACY_NS


def warn_if_shared(path: Path, signature: FileSignature | None, what: str) -> bool:
    """Log once-worthy warning when others may read a secret file; True when warned."""
    if signature is None or not signature.mode & (stat.S_IRGRP | stat.S_IROTH):
        return False
    get_logger().warning(
        "secret_file_readable_by_others",
        path=str(path),
        file=what,
        mode=oct(stat.S_IMODE(signature.mode)),
        hint=f"chmod 600 {path}",
    )
    return True
