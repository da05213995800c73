"""`WWW-Authenticate` parsing (RFC 9110 §11.6.1), and the Bearer error it carries.

Pure functions over header text. A target's challenge is untrusted input: parsing must
never raise, whatever it is sent; a malformed header yields the challenges that could be
read before and after the damage. Nothing here looks at or returns a credential.

    WWW-Authenticate = #challenge
    challenge        = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
    auth-param       = token BWS "=" BWS ( token / quoted-string )

Commas separate both challenges and auth-params, so a list element is a new challenge
exactly when it does not look like `token BWS "="`.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass, field

_TCHAR = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)
_TOKEN68_CHAR = frozenset(string.ascii_letters + string.digits + "-._~+/")
_WS = frozenset(" \t")


@dataclass(frozen=True, slots=True)
class Challenge:
    """One challenge: scheme and parameter names lowercased; values as sent (unquoted)."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)
    token68: str | None = None


@dataclass(frozen=True, slots=True)
class BearerError:
    """The RFC 6750 §3 error fields of a Bearer challenge (all None when absent)."""

    error: str | None = None
    error_description: str | None = None
    scope: str | None = None
    resource_metadata: str | None = None  # RFC 9728 §5.1


class _Scanner:
    """A cursor over one header value; every method stops safely at the end."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    @property
    def done(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ws(self) -> None:
        while self.peek() in _WS and not self.done:
            self.pos += 1

    def skip_ws_and_commas(self) -> None:
        while not self.done and (self.peek() in _WS or self.peek() == ","):
            self.pos += 1

    def take(self, chars: frozenset[str]) -> str:
        start = self.pos
        while not self.done and self.text[self.pos] in chars:
            self.pos += 1
        return self.text[start:self.pos]

    def skip_element(self) -> None:
        """Skip damaged text up to the next list separator, honouring quoted strings."""
        while not self.done and self.peek() != ",":
            if self.peek() == '"':
                self.quoted_string()
            else:
                self.pos += 1

    def quoted_string(self) -> str:
        """Read a quoted-string at the cursor; an unterminated one runs to the end."""
        self.pos += 1  # the opening quote
        out: list[str] = []
        while not self.done:
            ch = self.text[self.pos]
            self.pos += 1
            if ch == '"':
                break
            if ch == "\\" and not self.done:
                ch = self.text[self.pos]
                self.pos += 1
            out.append(ch)
        return "".join(out)

    def at_param(self) -> bool:
        """Does `token BWS "="` start here (and not a token68 such as `abc==`)?"""
        start = self.pos
        try:
            if not self.take(_TCHAR):
                return False
            self.skip_ws()
            return self.peek() == "="
        finally:
            self.pos = start

    def at_token68(self) -> bool:
        """Is the rest of this list element exactly one token68?"""
        start = self.pos
        try:
            if not self.take(_TOKEN68_CHAR):
                return False
            while self.peek() == "=":
                self.pos += 1
            self.skip_ws()
            return self.done or self.peek() == ","
        finally:
            self.pos = start


def _read_value(scan: _Scanner) -> str:
    if scan.peek() == '"':
        return scan.quoted_string()
    # Lenient: an unquoted value runs to whitespace or a comma (a bare URL, say).
    start = scan.pos
    while not scan.done and scan.peek() not in _WS and scan.peek() != ",":
        scan.pos += 1
    return scan.text[start:scan.pos]


def _read_params(scan: _Scanner) -> dict[str, str]:
    params: dict[str, str] = {}
    while True:
        scan.skip_ws()
        if not scan.at_param():
            return params
        name = scan.take(_TCHAR).lower()
        scan.skip_ws()
        scan.pos += 1  # "="
        scan.skip_ws()
        value = _read_value(scan)
        params.setdefault(name, value)  # RFC 9110: a name appears once; keep the first
        scan.skip_ws()
        if not scan.done and scan.peek() != ",":
            if scan.at_param():
                continue  # a missing comma between params: read on
            scan.skip_element()  # junk after a value; resync at the next comma
        scan.skip_ws_and_commas()


def _parse_one(text: str, out: list[Challenge]) -> None:
    scan = _Scanner(text)
    while True:
        scan.skip_ws_and_commas()
        if scan.done:
            return
        scheme = scan.take(_TCHAR)
        if not scheme:
            scan.skip_element()  # not a scheme: drop this element (always moves on)
            continue
        if scan.peek() not in _WS and not scan.done and scan.peek() != ",":
            scan.skip_element()  # e.g. `Bearer=x`: no scheme can be read here
            continue
        scan.skip_ws()
        if scan.done or scan.peek() == ",":
            out.append(Challenge(scheme.lower()))
        elif scan.at_token68():
            token68 = scan.take(_TOKEN68_CHAR) + scan.take(frozenset("="))
            out.append(Challenge(scheme.lower(), token68=token68))
        else:
            start = scan.pos
            out.append(Challenge(scheme.lower(), _read_params(scan)))
            if scan.pos == start:
                scan.skip_element()  # neither token68 nor a param: the rest is junk


def parse_challenges(values: Iterable[str] | str) -> list[Challenge]:
    """Every challenge in one header value or in several header lines, in order."""
    if isinstance(values, str):
        values = (values,)
    out: list[Challenge] = []
    for value in values:
        if isinstance(value, str):
            _parse_one(value, out)
    return out


def bearer_error(values: Iterable[str] | str) -> BearerError:
    """The error fields of the first Bearer challenge; all None when there is none."""
    for challenge in parse_challenges(values):
        if challenge.scheme == "bearer":
            p = challenge.params
            return BearerError(
                error=p.get("error") or None,
                error_description=p.get("error_description") or None,
                scope=p.get("scope") or None,
                resource_metadata=p.get("resource_metadata") or None,
            )
    return BearerError()
