"""The start-up check of dependency versions (`proxy.wire.compat`) and its agreement with
what `pyproject.toml` declares."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest

from proxy.cli.main import main
from proxy.wire import compat

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_the_checked_ranges_are_the_declared_ones() -> None:
    """pyproject.toml's ranges for aiohttp and httptools are exactly what start-up checks."""
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    for name in compat.SUPPORTED:
        (spec,) = [d for d in declared if re.match(rf"{name}\b", d)]
        assert spec == name + compat.supported_range(name)


@pytest.mark.parametrize(("installed", "ok"), [
    ({"aiohttp": "3.12.0", "httptools": "0.6.4"}, True),
    ({"aiohttp": "3.14.5", "httptools": "0.9.0"}, True),
    ({"aiohttp": "3.11.18", "httptools": "0.9.0"}, False),
    ({"aiohttp": "3.15.0", "httptools": "0.9.0"}, False),
    ({"aiohttp": "4.0.0a1", "httptools": "0.9.0"}, False),
    ({"aiohttp": "3.14.5", "httptools": "0.6.1"}, False),
    ({"aiohttp": "3.14.5", "httptools": None}, False),
])
def test_versions_inside_the_ranges_pass_and_others_are_named(
    installed: dict[str, str | None], ok: bool
) -> None:
    """Both bounds are honoured; a refusal names the installed and the supported version."""
    if ok:
        compat.check(installed)
        return
    with pytest.raises(compat.UnsupportedDependency) as caught:
        compat.check(installed)
    message = str(caught.value)
    assert "\n" not in message
    bad = next(name for name in compat.SUPPORTED
               if installed[name] is None or installed[name] in ("3.11.18", "3.15.0",
                                                                  "4.0.0a1", "0.6.1"))
    assert compat.supported_range(bad) in message
    if installed[bad] is not None:
        assert f"{bad} {installed[bad]} is installed" in message


def test_the_cli_stops_at_start_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mcp-authproxy run` with an unsupported aiohttp exits 1 before serving, saying so
    on one stderr line (never a traceback, never a proxy that resets connections)."""
    real = installed_version  # what compat.version is until patched
    monkeypatch.setattr(compat, "version",
                        lambda name: "3.11.18" if name == "aiohttp" else real(name))
    code = main(["run", "--target-url", "http://127.0.0.1:9/mcp", "--port", "0"])
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.err.strip().splitlines()
    assert lines == ["mcp-authproxy: error: unsupported dependency version: aiohttp 3.11.18 "
                     "is installed, supported: >=3.12,<3.15"]
    assert captured.out == ""
