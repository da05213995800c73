#!/usr/bin/env python3
"""The "person" of the sign-in tests: a `$BROWSER` that fills in the login and consent
pages of the test authorization server (node-oidc-provider's development pages) with
plain HTTP requests, and follows the final redirect to the loopback callback.

Standard library only, so that `webbrowser` can start it as `$BROWSER` whatever Python
runs it. Usage: `browser.py URL` (an authorization URL), or `browser.py --device URL`
(a device verification URL). What it does is chosen by `SIGNIN_BROWSER_MODE`:

- `consent` (default): log in as `SIGNIN_BROWSER_USER` (alice) and consent;
- `deny`: log in, then abort at the consent page (the server answers access_denied);
- `wrong-state`: at the end, call the callback with a tampered `state` only;
- `wrong-state-then-consent`: call it with a tampered `state` first, then the real one.

Each step is appended as one JSON line to `SIGNIN_BROWSER_LOG` when set (URLs without
their query, status codes), so tests can assert what the person saw.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from typing import Any

TIMEOUT = 10.0
MAX_STEPS = 20


class _Forms(HTMLParser):
    """Collects forms (action, method, inputs) and links of one page."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []
        self.links: list[str] = []
        self._form: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._form = {"action": a.get("action", ""), "method": a.get("method", "get"),
                          "id": a.get("id", ""), "inputs": []}
            self.forms.append(self._form)
        elif tag == "input":
            field = (a.get("name", ""), a.get("value", ""), a.get("type", "text"))
            # Device pages put inputs outside the form, tied to it by `form=`.
            owner = a.get("form")
            target = next((f for f in self.forms if owner and f["id"] == owner), self._form)
            if target is not None and field[0]:
                target["inputs"].append(field)
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._form = None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # redirects are followed by hand, to stop at the callback


def _log(**event: Any) -> None:
    path = os.environ.get("SIGNIN_BROWSER_LOG")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps(event) + "\n")


def _strip(url: str) -> str:
    return url.split("?", 1)[0]


class Person:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), _NoRedirect())
        self.callback_prefix: str | None = None

    def request(self, url: str, data: dict[str, str] | None = None) -> tuple[int, str, str]:
        """(status, body, location) of one request, redirects not followed."""
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(url, data=body, method="POST" if body else "GET")
        try:
            with self.opener.open(req, timeout=TIMEOUT) as resp:
                status, text, location = resp.status, resp.read().decode(), ""
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode(errors="replace")
            location = err.headers.get("Location", "")
        _log(step="request", method=req.get_method(), url=_strip(url), status=status)
        return status, text, urllib.parse.urljoin(url, location) if location else ""

    def walk(self, url: str, data: dict[str, str] | None = None) -> int:
        for _ in range(MAX_STEPS):
            if self.callback_prefix and url.startswith(self.callback_prefix):
                return self.callback(url)
            status, text, location = self.request(url, data)
            data = None
            if location:
                url = location
                continue
            if status != 200:
                return 1
            next_step = self.fill(url, text)
            if next_step is None:
                return 0  # a final page (the device flow's success page)
            url, data = next_step
        return 1

    def fill(self, url: str, page: str) -> tuple[str, dict[str, str] | None] | None:
        forms = _Forms()
        forms.feed(page)
        usable = [f for f in forms.forms if f["inputs"]]
        if not usable:
            return None
        form = usable[0]
        fields = {name: value for name, value, _ in form["inputs"]}
        prompt = fields.get("prompt")
        if prompt == "consent" and self.mode == "deny":
            abort = next((link for link in forms.links if "/abort" in link), None)
            _log(step="deny")
            return (urllib.parse.urljoin(url, abort), None) if abort else None
        if prompt == "login":
            fields["login"] = os.environ.get("SIGNIN_BROWSER_USER", "alice")
            fields["password"] = "any password"
        _log(step="submit", form=prompt or form["id"] or "form")
        return urllib.parse.urljoin(url, form["action"]), fields

    def callback(self, url: str) -> int:
        parts = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parts.query))
        if self.mode.startswith("wrong-state"):
            tampered = {**query, "state": "tampered-" + query.get("state", "")}
            bad = parts._replace(query=urllib.parse.urlencode(tampered)).geturl()
            status, _, _ = self.request(bad)
            _log(step="callback", state="tampered", status=status)
            if self.mode == "wrong-state":
                return 0
        status, _, _ = self.request(url)
        _log(step="callback", state="real", status=status, error=query.get("error"))
        return 0 if status == 200 else 1


def main(argv: list[str]) -> int:
    mode = os.environ.get("SIGNIN_BROWSER_MODE", "consent")
    person = Person(mode)
    if argv[:1] == ["--device"]:
        _log(step="open", kind="device", url=_strip(argv[1]))
        return person.walk(argv[1])
    url = argv[0]
    _log(step="open", kind="authorization", url=_strip(url))
    redirect = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)).get(
        "redirect_uri")
    person.callback_prefix = redirect
    return person.walk(url)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
