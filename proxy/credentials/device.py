"""The device authorization grant (RFC 8628): `login --device`, for a machine without a
browser.

The person is shown the verification URI and the user code on stderr (the code is
meant for them: it is not a credential the proxy keeps); the device code is never
shown. The token endpoint is polled at the server's interval (slower when it says
`slow_down`) until the person consents, refuses, or the code or `--timeout` runs out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from ..errors import SignInError
from .discovery import ServerMetadata
from .login_http import TokenAnswer, check_token_answer, json_object, post_form, refusal
from .registration import DEVICE_GRANT, Client

DEFAULT_INTERVAL = 5.0  # seconds between polls when the server names none (RFC 8628 §3.2)
SLOW_DOWN = 5.0  # seconds added to the interval on `slow_down` (RFC 8628 §3.5)


async def device_grant(session: aiohttp.ClientSession, server: ServerMetadata,
                       endpoint: str, client: Client, *, resource: str,
                       scopes: tuple[str, ...], timeout: float, say: Callable[[str], None]
                       ) -> TokenAnswer:
    """Ask `endpoint` (the server's device authorization endpoint) for a device code,
    show the person where to enter it, poll the token endpoint for the tokens."""
    step = "device authorization"
    form = {"resource": resource}
    if scopes:
        form["scope"] = " ".join(scopes)
    headers = client.auth(form)
    status, body = await post_form(session, endpoint, form, headers, step)
    doc = json_object(body)
    if doc is None or status != 200:
        raise refusal(doc, status, f"the server answered {status}", step)
    device_code, user_code = doc.get("device_code"), doc.get("user_code")
    uri = doc.get("verification_uri")
    if not all(isinstance(v, str) and v for v in (device_code, user_code, uri)):
        raise SignInError(step, "the answer lacks device_code, user_code or "
                          "verification_uri", "invalid_response")
    assert isinstance(device_code, str)
    complete = doc.get("verification_uri_complete")
    say(f"To sign in to {server.issuer}, visit {uri} and enter the code {user_code}"
        + (f"\n(or open {complete})" if isinstance(complete, str) else ""))
    interval = doc.get("interval")
    wait = (float(interval) if isinstance(interval, int | float) and interval > 0
            else DEFAULT_INTERVAL)
    expires = doc.get("expires_in")
    limit = min(timeout, float(expires) if isinstance(expires, int | float) and expires > 0
                else timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        if loop.time() + wait > deadline:
            raise SignInError(step, f"not completed within {limit:g} s", "expired_token")
        await asyncio.sleep(wait)  # the protocol's poll interval, not a wait for an event
        poll = {"grant_type": DEVICE_GRANT, "device_code": device_code,
                "resource": resource}
        headers = client.auth(poll)
        status, body = await post_form(session, server.token_endpoint, poll, headers,
                                       "token request")
        try:
            return check_token_answer(status, body, "token request")
        except SignInError as exc:
            if exc.code == "authorization_pending":
                continue
            if exc.code == "slow_down":
                wait += SLOW_DOWN
                continue
            raise
