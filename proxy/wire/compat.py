"""The one place that knows which versions of the HTTP layer's dependencies are supported.

The proxy uses only public API of aiohttp (its client session, `hdrs`, the admin web
server) and of httptools (its callback parsers), and `pyproject.toml` declares the
ranges below, both bounds tested (`tests/packaging/test_dependency_bounds.py`). An environment
that pins something outside them anyway (pip installs what it is told) is refused at
start-up with one line naming the installed and the supported versions, rather than
failing later in ways that are hard to see. This module must never import the packages
it checks (an unsupported version may not even import), and must stay the only one
that compares versions.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ..errors import ProxyError

# name: (lowest supported, first unsupported), as in pyproject.toml's dependencies.
SUPPORTED: dict[str, tuple[str, str]] = {
    "aiohttp": ("3.12", "3.15"),
    "httptools": ("0.6.4", "0.10"),
}


class UnsupportedDependency(ProxyError):
    """An installed dependency is outside the range the proxy is tested with."""


def _release(text: str) -> tuple[int, ...]:
    """The numeric release part of a version (`3.14.0rc1` -> (3, 14, 0))."""
    numbers: list[int] = []
    for part in text.split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        numbers.append(int(digits))
        if len(digits) != len(part):
            break
    return tuple(numbers)


def supported_range(name: str) -> str:
    low, high = SUPPORTED[name]
    return f">={low},<{high}"


def problems(installed: dict[str, str | None] | None = None) -> list[str]:
    """One phrase per dependency outside its range (none when all fit)."""
    found = []
    for name, (low, high) in SUPPORTED.items():
        if installed is not None:
            have = installed.get(name)
        else:
            try:
                have = version(name)
            except PackageNotFoundError:
                have = None
        if have is None:
            found.append(f"{name} is not installed (supported: {supported_range(name)})")
        elif not _release(low) <= _release(have) < _release(high):
            found.append(f"{name} {have} is installed, supported: {supported_range(name)}")
    return found


def check(installed: dict[str, str | None] | None = None) -> None:
    """Raise UnsupportedDependency (one line) when a dependency is out of range."""
    found = problems(installed)
    if found:
        raise UnsupportedDependency("unsupported dependency version: " + "; ".join(found))
