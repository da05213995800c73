"""`ForwardingServer`: the listening side of the proxy, with the limits aiohttp lacks.

It owns the upstream session and the listening sockets, runs the forwarding handler on
aiohttp's low-level server (no router on the hot path), and adds two guards aiohttp does
not have: a `header_timeout` for clients that trickle their request headers (slowloris)
and a cap on concurrent client connections (503 above it). Shutdown drains in-flight
requests for a bounded time, then cancels them. It must never block the loop, and never
leave a socket, task or upstream connection behind after `shutdown`.
"""

from __future__ import annotations

import asyncio
import gc
import resource
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .config import ProxyConfig
from .credentials import CredentialSource
from .forward import Forwarder
from .headers import error_body
from .log import get_logger
from .observe import ForwardObserver
from .upstream import UpstreamPool, make_session

# After the handler returns, how long a client that is still sending an unwanted body
# (a 413) is read and ignored before its connection is closed.
LINGERING_TIME = 1.0


def _busy_answer() -> bytes:
    body = error_body("service_unavailable", "too many connections to the proxy")
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


BUSY_ANSWER = _busy_answer()

# File descriptors kept free for everything but client connections: listeners, the
# status file and its lock, logs, the admin port, token files.
FD_RESERVE = 64


def fitting_connection_cap(max_connections: int, fd_limit: int) -> int:
    """The connection cap that fits `fd_limit`: each client may hold an upstream socket too.

    Above the descriptor limit, accept() fails and clients hang instead of getting the
    cap's clear 503.
    """
    return max(1, min(max_connections, (fd_limit - FD_RESERVE) // 2))


def _connection_cap(max_connections: int, log: Any) -> int:
    """Raise the soft descriptor limit as far as the cap needs, then fit the cap into it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        wanted = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return max_connections
    cap = fitting_connection_cap(max_connections, soft)
    if cap < max_connections:
        log.warning("connection_cap_lowered", max_connections=cap, fd_limit=soft,
                    wanted=max_connections)
    return cap


class _GuardedHandler(RequestHandler):
    """aiohttp's connection protocol plus a request-header timer and the connection cap."""

    def __init__(self, manager: _GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_deadline: float | None = None
        self._rejected: asyncio.Transport | None = None

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Malformed or oversized requests: a short JSON answer, never the input echoed.

        aiohttp's own answer quotes the offending bytes back (an `Authorization` value
        among them) and logs a traceback through stdlib logging; ours names the problem.
        """
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        too_large = isinstance(exc, LineTooLong) or (
            exc is not None and "Too many headers" in str(exc))  # aiohttp has no class for it
        if too_large:
            status = 431
            answer = error_body("request_header_fields_too_large",
                                "the request line or headers are too large")
        elif status == 500:
            answer = error_body("internal_error", "the proxy failed to handle the request")
        else:
            answer = error_body("bad_request", "the request is not valid HTTP/1.1")
        self._guard.log.info("bad_request", status=status,
                             problem=type(exc).__name__ if exc else None)
        response = web.Response(status=status, body=answer, content_type="application/json")
        response.force_close()
        return response

    # The header timer runs while we wait for a request's headers: from the connection's
    # start, and again after each response on a kept-alive connection. Arming and
    # disarming only move a deadline; the one timer re-checks it when it fires, so a busy
    # keep-alive connection does not make and cancel a timer for every request.
    def _arm(self) -> None:
        self._header_deadline = deadline = self._loop.time() + self._guard.header_timeout
        if self._header_timer is None:
            self._header_timer = self._loop.call_at(deadline, self._expire)

    def _disarm(self) -> None:
        self._header_deadline = None

    def _stop_timer(self) -> None:
        self._header_deadline = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        deadline = self._header_deadline
        if deadline is None:
            return  # disarmed meanwhile: the next _arm starts a new timer
        if self._loop.time() < deadline:
            self._header_timer = self._loop.call_at(deadline, self._expire)
            return
        if self._rejected is not None:
            self._rejected.abort()
        elif self._current_request is None and not self._messages:
            self.force_close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._guard.connection_count >= self._guard.max_connections:
            # Over the cap: answer 503 to whatever the client sends first, then close.
            # A cast, not an isinstance check: uvloop's transports do not subclass
            # asyncio.Transport, and an assert here broke the cap under the CLI.
            self._rejected = cast(asyncio.Transport, transport)
            self._arm()
            return
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        rejected = self._rejected
        if rejected is not None:
            if not rejected.is_closing():
                rejected.write(BUSY_ANSWER)
                rejected.close()
            return
        super().data_received(data)
        if self._messages:
            self._disarm()  # complete request headers arrived

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_timer()
        if self._rejected is not None:
            self._rejected = None
            return
        super().connection_lost(exc)

    async def _handle_request(
        self,
        request: BaseRequest,
        start_time: float | None,
        request_handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            if not self._force_close and not self._close:
                self._arm()


class _GuardedServer(web.Server):
    """aiohttp's low-level server making `_GuardedHandler`s."""

    def __init__(self, handler: Forwarder, *, header_timeout: float, max_connections: int,
                 log: Any, **kwargs: Any) -> None:
        super().__init__(handler, handler_cancellation=True, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.log = log

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def __call__(self) -> RequestHandler:
        return _GuardedHandler(self, loop=self._loop, **self._kwargs)


# Young-generation threshold while serving. Python's default (700 allocations) ran a
# collection every ~50 requests at c=64, and the older generations then walked every
# object the imports left: 11-14 us of GC per request, 7-8 % of the proxy's CPU. With the
# startup heap frozen and 10,000 it was under 2 us (timed with gc.callbacks).
SERVING_GC_THRESHOLD = (10_000, 50, 100)


def tune_gc_for_serving() -> None:
    """Make the garbage collector cheap for a process whose job is serving the proxy.

    For the process owner (the CLI) to call once everything is imported and started;
    never called by `ForwardingServer` itself, since an embedding application owns its
    process's collector. It freezes what exists (imports, config) out of the collector's
    reach and collects the young generation less often; cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_GC_THRESHOLD)


def display_host(host: str) -> str:
    """The host part of the URL a client should use for a bind address."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


class ForwardingServer:
    """The forwarding proxy's listener. `start()`, then `shutdown(drain_timeout)`."""

    def __init__(
        self,
        config: ProxyConfig,
        credentials: CredentialSource | None = None,
        observers: Iterable[ForwardObserver] = (),
        logger: Any = None,
    ) -> None:
        self._config = config
        self._credentials = credentials
        self._observers = tuple(observers)
        self._log = logger if logger is not None else get_logger()
        self._session: aiohttp.ClientSession | None = None
        self._pool: UpstreamPool | None = None
        self._forwarder: Forwarder | None = None
        self._server: _GuardedServer | None = None
        self._listeners: list[asyncio.Server] = []
        self._port = 0

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ForwardingServer.start() has not been called")
        return self._session

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        path = self._config.target.raw_path or "/"
        return f"http://{display_host(self._config.host)}:{self._port}{path}"

    @property
    def in_flight(self) -> int:
        return self._forwarder.in_flight if self._forwarder is not None else 0

    async def start(self) -> None:
        config = self._config
        self._session = make_session(config)
        self._pool = UpstreamPool(config)
        try:
            self._forwarder = Forwarder(
                config, self._session, credentials=self._credentials,
                observers=self._observers, logger=self._log, pool=self._pool,
            )
            self._server = _GuardedServer(
                self._forwarder,
                header_timeout=config.header_timeout,
                max_connections=_connection_cap(config.max_connections, self._log),
                log=self._log,
                keepalive_timeout=config.keepalive_timeout,
                lingering_time=LINGERING_TIME,
                access_log=None,  # we log our own access event, with redaction
                auto_decompress=False,  # a gzip upload is forwarded gzipped, as sent
                # Large cookies and tokens are the target's to judge, not 8 KiB-capped here.
                max_line_size=65536,
                max_field_size=65536,
            )
            await self._listen(config.host, config.port)
        except BaseException:
            await self._pool.close()
            await self._session.close()
            self._session = None
            raise

    async def _listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        assert self._server is not None
        bind: str | None = None if host in ("", "::") else host  # None: every interface
        listener = await loop.create_server(self._server, bind, port, reuse_address=True,
                                            backlog=1024)
        ports = {sock.getsockname()[1] for sock in listener.sockets}
        if len(ports) > 1:
            # A name like "localhost" bound to several addresses, each on its own free
            # port: bind them all again on the first one's port.
            listener.close()
            first = listener.sockets[0].getsockname()[1]
            listener = await loop.create_server(self._server, bind, first, reuse_address=True,
                                                backlog=1024)
        self._listeners.append(listener)
        sock: socket.socket = listener.sockets[0]
        self._port = sock.getsockname()[1]

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop accepting, let in-flight requests finish for `drain_timeout`, then cancel."""
        for listener in self._listeners:
            listener.close()
        server, forwarder = self._server, self._forwarder
        if server is not None and forwarder is not None:
            server.pre_shutdown()  # idle keep-alive connections close now, busy ones after
            if not await forwarder.wait_idle(drain_timeout):
                tasks = forwarder.cancel_all()
                self._log.info("drain_timeout", cancelled=len(tasks))
                await asyncio.wait(tasks, timeout=1.0)
            await server.shutdown(1.0)
        self._listeners.clear()
        self._server = None
        if self._pool is not None:
            await self._pool.close()
        if self._session is not None:
            await self._session.close()  # kept (closed) so late readers see `.closed`
