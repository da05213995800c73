"""The credentials file: where it lives, what it accepts, who wins a race."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from proxy.credentials.signin_store import (
    CredentialsFileRefused,
    StoredSignIn,
    load_signin,
    save_signin,
    signin_path,
    write_back,
)

NOW = datetime.now(UTC).replace(microsecond=0)  # the file keeps whole seconds


def signin(**changes: Any) -> StoredSignIn:
    """A sign-in as `login` stores it, with `changes` (StoredSignIn fields) made."""
    base = StoredSignIn(
        target_url="https://mcp.example/mcp", resource="https://mcp.example/mcp",
        issuer="https://as.example", token_endpoint="https://as.example/token",
        client_id="client", access_token="access-1", refresh_token="refresh-1",
        expires_at=NOW + timedelta(hours=1), signed_in_at=NOW, scope=("mcp:read",))
    return dataclasses.replace(base, **changes)


def test_saved_private_and_read_back(tmp_path: Path) -> None:
    """A sign-in is written 0600 in a 0700 directory, with the contract's keys, and reads
    back the same."""
    original = signin(client_secret="s3cret")
    path = save_signin(tmp_path, "w", original)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    keys = set(json.loads(path.read_text()))
    assert {"target_url", "resource", "issuer", "token_endpoint", "client_id",
            "client_secret", "access_token", "refresh_token", "expires_at",
            "scope"} <= keys
    assert load_signin(tmp_path, "w") == original
    assert "access-1" not in repr(original) and "s3cret" not in repr(original)


def test_missing_is_none(tmp_path: Path) -> None:
    """No file is no sign-in, not an error."""
    assert load_signin(tmp_path, "nobody") is None


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o400, 0o700])
def test_other_modes_are_refused(tmp_path: Path, mode: int) -> None:
    """Any mode but 0600 is refused with one line naming the file and the mode."""
    path = save_signin(tmp_path, "w", signin())
    path.chmod(mode)

    with pytest.raises(CredentialsFileRefused) as caught:
        load_signin(tmp_path, "w")

    message = str(caught.value)
    assert str(path) in message and f"{mode:04o}" in message and "\n" not in message


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    """A link planted where the file should be is refused, even to a good file."""
    real = save_signin(tmp_path / "elsewhere", "w", signin())
    path = signin_path(tmp_path, "w")
    path.parent.mkdir(mode=0o700, parents=True)
    path.symlink_to(real)

    with pytest.raises(CredentialsFileRefused, match="symbolic link"):
        load_signin(tmp_path, "w")


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO in its place is refused at once (opened non-blocking), not waited on."""
    path = signin_path(tmp_path, "w")
    path.parent.mkdir(mode=0o700, parents=True)
    os.mkfifo(path, 0o600)

    with pytest.raises(CredentialsFileRefused, match="not a regular file"):
        load_signin(tmp_path, "w")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_a_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    """A file another user owns is refused, whatever its mode."""
    path = save_signin(tmp_path, "w", signin())
    os.chown(path, 65534, 65534)

    with pytest.raises(CredentialsFileRefused, match="owned by uid 65534"):
        load_signin(tmp_path, "w")


def test_write_back_lands_on_the_same_sign_in(tmp_path: Path) -> None:
    """A refreshed token is written back onto the sign-in it came from."""
    first = signin()
    save_signin(tmp_path, "w", first)

    assert write_back(tmp_path, "w", first.refreshed("access-2", "refresh-2", None, None))

    stored = load_signin(tmp_path, "w")
    assert stored is not None
    assert (stored.access_token, stored.refresh_token) == ("access-2", "refresh-2")
    assert stored.signin_id == first.signin_id


def test_write_back_never_overwrites_a_newer_sign_in(tmp_path: Path) -> None:
    """A refresh that finishes after a new `login` leaves the new sign-in alone."""
    old = signin()
    save_signin(tmp_path, "w", old)
    newer = signin(access_token="access-new", refresh_token="refresh-new",
                   scope=("mcp:read", "mcp:write"))
    save_signin(tmp_path, "w", newer)

    assert not write_back(tmp_path, "w", old.refreshed("access-2", "refresh-2", None, None))

    assert load_signin(tmp_path, "w") == newer


def test_save_refuses_to_replace_a_symlink(tmp_path: Path) -> None:
    """`login` does not write through (or over) a link someone planted."""
    target = tmp_path / "victim"
    target.write_text("keep me")
    path = signin_path(tmp_path, "w")
    path.parent.mkdir(mode=0o700, parents=True)
    path.symlink_to(target)

    with pytest.raises(CredentialsFileRefused):
        save_signin(tmp_path, "w", signin())

    assert target.read_text() == "keep me"


def test_a_linked_credentials_directory_is_refused(tmp_path: Path) -> None:
    """`credentials/` planted as a link to another directory is refused with one line
    naming the flag, and nothing is written where it points."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "credentials").symlink_to(elsewhere)

    with pytest.raises(CredentialsFileRefused, match=r"^--state-dir: .*symbolic link") as caught:
        save_signin(state, "w", signin())

    assert "\n" not in str(caught.value)
    assert list(elsewhere.iterdir()) == []


def test_a_lock_file_planted_as_a_link_is_cleared(tmp_path: Path) -> None:
    """A `.lock` link in the credentials directory is cleared, never opened through, and
    the sign-in is saved."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    path = signin_path(tmp_path / "state", "w")
    path.parent.mkdir(mode=0o700, parents=True)
    Path(str(path) + ".lock").symlink_to(victim)

    save_signin(tmp_path / "state", "w", signin())

    assert victim.read_text() == "keep me"
    stored = load_signin(tmp_path / "state", "w")
    assert stored is not None and stored.access_token == "access-1"
