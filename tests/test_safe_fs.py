"""`proxy.safe_fs`: the checks every directory and file others must not control goes
through (status files and the sign-in's credentials)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from proxy.errors import UnsafePath
from proxy.safe_fs import (
    NotRegularFile,
    check_owned_dir,
    ensure_private_dir,
    read_regular,
    write_atomically,
)


def test_a_fifo_or_a_link_is_never_read_and_never_blocks(tmp_path: Path) -> None:
    """Reading a FIFO, a link or a directory raises at once instead of hanging or
    following the link; a regular file is read up to the limit, a missing one is None."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "real").write_bytes(b"0123456789")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for name, kind in (("fifo", "a FIFO"), ("link", "a symbolic link")):
        with pytest.raises(NotRegularFile) as raised:
            read_regular(tmp_path / name, 100)
        assert raised.value.kind == kind
    with pytest.raises(NotRegularFile):
        read_regular(tmp_path, 100)
    assert read_regular(tmp_path / "real", 4) == b"01234"
    assert read_regular(tmp_path / "missing", 4) is None


def test_a_private_file_must_be_the_users_and_closed_to_others(tmp_path: Path) -> None:
    """A token file readable by others is refused with one line naming the flag."""
    token = tmp_path / "token"
    token.write_text("t")
    token.chmod(0o644)
    with pytest.raises(UnsafePath, match=r"--oauth: .* chmod 600"):
        read_regular(token, 10, private="--oauth")
    token.chmod(0o600)
    assert read_regular(token, 10, private="--oauth") == b"t"


def test_a_private_dir_is_created_tightened_and_never_a_link(tmp_path: Path) -> None:
    """`workloads/` is made 0700, an existing loose one tightened through its own
    descriptor, and a link in its place refused without touching the link's target."""
    made = tmp_path / "made"
    assert ensure_private_dir(made, flag="--state-dir")
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    ensure_private_dir(loose, flag="--state-dir")
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700
    target = tmp_path / "target"
    target.mkdir()
    target.chmod(0o755)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(UnsafePath, match=r"--state-dir: .* symbolic link"):
        ensure_private_dir(tmp_path / "link", flag="--state-dir")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
    assert not ensure_private_dir(tmp_path / "absent", flag="--state-dir", create=False)


def test_a_dir_others_can_write_or_own_is_refused(tmp_path: Path) -> None:
    """A group- or world-writable directory, or one another user owns, is refused."""
    folder = tmp_path / "state"
    folder.mkdir()
    folder.chmod(0o755)
    assert check_owned_dir(folder, flag="--state-dir")
    folder.chmod(0o775)
    with pytest.raises(UnsafePath, match="writable by group or others"):
        check_owned_dir(folder, flag="--state-dir")
    folder.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(folder, 65534, 65534)
        with pytest.raises(UnsafePath, match="owned by uid 65534"):
            check_owned_dir(folder, flag="--state-dir")
    assert not check_owned_dir(tmp_path / "absent", flag="--state-dir")


def test_an_atomic_write_replaces_a_link_and_leaves_no_temp_file(tmp_path: Path) -> None:
    """`write_atomically` lands a 0600 file where a link was, without writing through it,
    and leaves nothing else behind."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "file").symlink_to(victim)

    write_atomically(folder / "file", b"new\n")

    assert victim.read_text() == "keep me"
    assert read_regular(folder / "file", 100) == b"new\n"
    assert stat.S_IMODE(os.lstat(folder / "file").st_mode) == 0o600
    assert [p.name for p in folder.iterdir()] == ["file"]
