"""Bearer credential sources: the token file that heals itself, the environment variable."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from proxy.config import ProxyConfig
from proxy.credentials import build_credential_source
from proxy.credentials.base import Credential
from proxy.credentials.bearer import EnvBearerSource, FileBearerSource
from proxy.credentials.files import check_secret_text
from proxy.credentials.oauth import OAuthSource
from proxy.errors import CredentialInvalid

from helpers import eventually

POLL = 0.02


class Reports:
    """Collects what a source tells the auth monitor."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, str, str, bool]] = []

    def __call__(self, available: bool, reason: str, message: str, permanent: bool) -> None:
        self.calls.append((available, reason, message, permanent))

    @property
    def last(self) -> tuple[bool, str, str, bool]:
        return self.calls[-1]


def write(path: Path, text: str, mode: int = 0o600) -> None:
    path.write_text(text)
    os.chmod(path, mode)


def rewrite_in_place(path: Path, text: str) -> None:
    with open(path, "r+") as handle:
        handle.write(text)


def replace_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    write(tmp, text)
    os.replace(tmp, path)


@contextlib.asynccontextmanager
async def started(token: Path, poll_interval: float = POLL
                  ) -> AsyncIterator[tuple[FileBearerSource, Reports]]:
    """A `FileBearerSource` on `token`, started (and closed after) with its `Reports`."""
    source = FileBearerSource(token, poll_interval=poll_interval)
    reports = Reports()
    await source.start(reports)
    try:
        yield source, reports
    finally:
        await source.close()


async def test_token_file_is_sent_stripped(tmp_path: Path) -> None:
    """A token file's contents, without the trailing newline, become the bearer header."""
    token = tmp_path / "token"
    write(token, "  s3cret-token\n")
    async with started(token) as (source, reports):
        credential = await source.get()
        assert credential.authorization == "Bearer s3cret-token"
        assert source.ready() is credential  # the forwarding path's no-await answer
        assert source.current_version == credential.version
        assert reports.calls == [(True, "TokenLoaded", f"token file {token} loaded", False)]
        assert source.can_refresh is False
        assert "s3cret" not in repr(credential)


async def test_missing_file_heals_when_it_appears(tmp_path: Path) -> None:
    """A token file missing at start gives 503s and an unauthenticated report, then heals."""
    token = tmp_path / "token"
    async with started(token) as (source, reports):
        assert reports.calls == [
            (False, "TokenFileMissing", f"token file {token} does not exist", True)]
        assert source.ready() is None  # nothing at hand: the caller awaits get()
        with pytest.raises(CredentialInvalid) as raised:
            await source.get()
        assert raised.value.reason == "TokenFileMissing"
        assert str(token) in raised.value.message
        assert raised.value.retry_after > 0
        assert source.current_version is None
        write(token, "fresh-token\n")
        await eventually(lambda: reports.last[0])
        assert reports.last[:2] == (True, "TokenLoaded")
        assert (await source.get()).authorization == "Bearer fresh-token"
        assert len(reports.calls) == 2  # one report per change, none per poll


async def test_empty_and_unreadable_files_are_reported(tmp_path: Path) -> None:
    """An emptied or unreadable token file stops requests with a reason naming the path."""
    token = tmp_path / "token"
    write(token, "first-token")
    async with started(token) as (source, reports):
        write(token, "\n\n")
        await eventually(lambda: reports.last[1] == "TokenFileEmpty")
        assert reports.last == (False, "TokenFileEmpty", f"token file {token} is empty", True)
        with pytest.raises(CredentialInvalid):
            await source.get()
        token.unlink()
        token.mkdir()  # root reads any mode, so a directory stands in for "unreadable"
        await eventually(lambda: reports.last[1] == "TokenFileUnreadable")
        assert str(token) in reports.last[2] and reports.last[3] is True
        token.rmdir()
        write(token, "second-token")
        await eventually(lambda: reports.last[0])
        assert (await source.get()).authorization == "Bearer second-token"


@pytest.mark.parametrize("how", ["in place", "atomic rename"])
async def test_rewritten_file_with_same_length_gives_new_version(
    tmp_path: Path, how: str
) -> None:
    """A fresh token of the same length, written in place or renamed over, is used."""
    token = tmp_path / "token"
    write(token, "token-aaaa")
    async with started(token) as (source, reports):
        first = await source.get()
        if how == "in place":
            rewrite_in_place(token, "token-bbbb")
        else:
            replace_atomically(token, "token-bbbb")

        async def changed() -> Credential | None:
            credential = await source.get()
            return credential if credential.version != first.version else None

        second = await eventually(changed, what="the file watcher to see the new token")
        assert second.authorization == "Bearer token-bbbb"
        assert second.version > first.version
        assert reports.calls == [reports.calls[0]]  # stayed available: nothing to report


async def test_after_unauthorized_rereads_the_file(tmp_path: Path) -> None:
    """After a 401 the proxy picks up a token written a moment ago, without waiting a poll."""
    token = tmp_path / "token"
    write(token, "old-token")
    async with started(token, poll_interval=3600) as (source, _):  # only a 401 re-reads
        old = await source.get()
        assert await source.after_unauthorized(old) is None  # unchanged: nothing new
        replace_atomically(token, "new-token")
        new = await source.after_unauthorized(old)
        assert new is not None and new.authorization == "Bearer new-token"
        assert await source.after_unauthorized(old) == new  # already moved on


async def test_group_readable_file_is_warned_about_once(tmp_path: Path) -> None:
    """A token file others can read is warned about once, without its contents."""
    token = tmp_path / "token"
    write(token, "visible-token", mode=0o644)
    with capture_logs() as logs:
        async with started(token) as (source, _):
            replace_atomically(token, "visible-token2")
            os.chmod(token, 0o640)
            await eventually(lambda: source.current_version == 2)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["path"] == str(token)
    assert "visible-token" not in repr(logs)


async def test_token_with_a_newline_inside_is_refused(tmp_path: Path) -> None:
    """A file holding two lines is refused rather than injecting a header."""
    token = tmp_path / "token"
    write(token, "abc\nX-Evil: 1\n")
    async with started(token) as (source, reports):
        assert reports.last[:2] == (False, "TokenFileInvalid")
        assert "abc" not in reports.last[2]
        with pytest.raises(CredentialInvalid):
            await source.get()


def test_secret_text_check_table() -> None:
    """Only one run of visible ASCII characters is accepted as a token."""
    assert check_secret_text(b" tok.en-_~+/=\n") == ("tok.en-_~+/=", "TokenLoaded")
    assert check_secret_text(b"\n \t") == (None, "TokenFileEmpty")
    assert check_secret_text(b"a b") == (None, "TokenFileInvalid")
    assert check_secret_text("tökén".encode()) == (None, "TokenFileInvalid")


async def test_env_source_reads_the_variable_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token from an environment variable is sent as a bearer header and never refreshed."""
    monkeypatch.setenv("MCP_TEST_TOKEN", " env-token \n")
    source = EnvBearerSource("MCP_TEST_TOKEN")
    reports = Reports()
    await source.start(reports)
    monkeypatch.setenv("MCP_TEST_TOKEN", "changed")
    credential = await source.get()
    assert credential.authorization == "Bearer env-token"
    assert source.ready() is credential
    assert await source.after_unauthorized(credential) is None
    assert reports.calls == [
        (True, "TokenLoaded", "token read from environment variable MCP_TEST_TOKEN", False)]
    assert source.can_refresh is False and source.current_version == 1
    await source.close()


async def test_env_source_without_value_is_invalid() -> None:
    """An environment variable emptied after validation gives 503s, not a crash."""
    source = EnvBearerSource("X", environ={"X": ""})
    reports = Reports()
    await source.start(reports)
    assert reports.calls[0][:2] == (False, "TokenEnvMissing")
    assert source.ready() is None
    with pytest.raises(CredentialInvalid):
        await source.get()


def test_build_picks_the_configured_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each credential flag builds its own kind of source; none builds nothing."""
    target = "http://127.0.0.1:9/mcp"
    assert build_credential_source(ProxyConfig(target_url=target)) is None
    file_source = build_credential_source(
        ProxyConfig(target_url=target, bearer_token_file=tmp_path / "t"))
    assert isinstance(file_source, FileBearerSource)
    monkeypatch.setenv("MCP_TEST_TOKEN", "x")
    assert isinstance(build_credential_source(
        ProxyConfig(target_url=target, bearer_token_env="MCP_TEST_TOKEN")), EnvBearerSource)
    oauth = build_credential_source(ProxyConfig(
        target_url=target, oauth_token_url="http://127.0.0.1:9/token", oauth_client_id="c"))
    assert isinstance(oauth, OAuthSource) and oauth.can_refresh
