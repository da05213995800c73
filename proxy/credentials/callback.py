"""The loopback redirect listener of a sign-in (RFC 8252 §7.3).

`http://127.0.0.1:PORT/callback` on loopback only, for one sign-in: it waits for the
authorization answer carrying this sign-in's `state`. Any other answer gets 400 and the
wait goes on, so another local process cannot end (or hijack) the sign-in by calling
first. The page a person sees says the tab can close. It never logs the query: that
holds the authorization code.
"""

from __future__ import annotations

import asyncio
import errno
import secrets
from collections.abc import Mapping

from aiohttp import hdrs, web

from ..errors import SignInError
from ..log import get_logger

CALLBACK_PATH = "/callback"
_CLOSE_PAGE = (
    "<!doctype html><html><head><meta charset='utf-8'><title>mcp-authproxy</title></head>"
    "<body><p>{text}</p></body></html>"
)


class CallbackListener:
    """`http://127.0.0.1:PORT/callback`: waits for the answer carrying our `state`.

    An answer with another `state` gets 400 and the listener keeps waiting, so another
    local process cannot end the sign-in by calling it first.
    """

    def __init__(self, state: str) -> None:
        self._state = state
        self._answer: asyncio.Future[Mapping[str, str]] = (
            asyncio.get_running_loop().create_future())
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.wrong_state = 0

    @property
    def redirect_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}{CALLBACK_PATH}"

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_get(CALLBACK_PATH, self._callback)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        # SO_REUSEADDR: a registered port in TIME_WAIT from the last sign-in is free again;
        # a port another process listens on still is not.
        site = web.TCPSite(self._runner, "127.0.0.1", port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.port = port or _bound_port(self._runner)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait(self, timeout: float) -> Mapping[str, str]:
        try:
            return await asyncio.wait_for(asyncio.shield(self._answer), timeout)
        except TimeoutError:
            what = (f"; {self.wrong_state} answer(s) with a wrong state were refused"
                    if self.wrong_state else "")
            raise SignInError("authorization", f"no answer within {timeout:g} s{what}",
                              "state" if self.wrong_state else "timeout") from None

    async def _callback(self, request: web.Request) -> web.Response:
        query = request.query
        if not secrets.compare_digest(query.get("state", "").encode(), self._state.encode()):
            self.wrong_state += 1
            get_logger().warning("login_callback_wrong_state")
            return _page(400, "This sign-in answer does not belong to the sign-in in "
                              "progress (wrong state).")
        if self._answer.done():
            return _page(400, "This sign-in is already finished.")
        self._answer.set_result(dict(query))
        if "error" in query:
            return _page(200, "Sign-in was not completed. You can close this tab.")
        return _page(200, "Signed in. You can close this tab and return to mcp-authproxy.")


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise OSError(errno.EADDRNOTAVAIL, "listener has no address")


def _page(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=_CLOSE_PAGE.format(text=text),
                        content_type="text/html", headers={hdrs.CACHE_CONTROL: "no-store"})
