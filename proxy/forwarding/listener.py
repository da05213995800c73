"""`ForwardingServer`: the listening side of the proxy.

It owns the upstream pool (and the session probes use) and the listening sockets, and runs
the forwarding handler on the lean protocol of `wire.server` (httptools' parser, no web
framework on the hot path), which carries the guards: a `header_timeout` for clients that trickle
their request headers (slowloris) and a cap on concurrent client connections (503 above
it, fitted here to the descriptor limit). Shutdown drains in-flight
requests for a bounded time, then cancels them. It must never block the loop, and never
leave a socket, task or upstream connection behind after `shutdown`.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import resource
import socket
from collections.abc import Iterable
from typing import Any

import aiohttp

from ..config import ProxyConfig
from ..credentials.base import CredentialSource
from ..log import get_logger
from ..wire.client import UpstreamPool
from ..wire.compat import check as check_dependencies
from ..wire.server import InboundServer
from ..wire.session import make_session
from .handler import Forwarder
from .observe import ForwardObserver

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


# Young-generation threshold while serving. Python's default (700 allocations) runs a
# collection every few dozen requests under load, and the older generations then walk
# every object the imports left. With the start-up heap frozen and a threshold of 10,000,
# collections become rare and cheap (see bench/RESULTS.md for how it was measured).
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


# Freed heap memory glibc keeps instead of returning it to the system at once. A bulk body
# allocates a parsed piece per chunk while the socket's read is still alive; with glibc's
# default the top of the heap crosses the trim threshold on every read and is given back
# and taken again (a brk call and fresh page faults per read: system time that showed as
# half the throughput of a download). Bounded: at most this much stays unreturned.
SERVING_TRIM_THRESHOLD = 8 * 2**20
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter number


def tune_malloc_for_serving() -> bool:
    """Let glibc keep up to SERVING_TRIM_THRESHOLD of freed heap (False where the C
    library has no `mallopt`, e.g. musl: nothing changes there). For the process owner
    (the CLI) only, like `tune_gc_for_serving`."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, SERVING_TRIM_THRESHOLD))


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
        self._server: InboundServer | None = None
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
    def relay_counts(self) -> dict[str, int]:
        """How many answers took each relay path (see `relay`)."""
        return dict(self._forwarder.relay_counts) if self._forwarder is not None else {}

    @property
    def in_flight(self) -> int:
        return self._forwarder.in_flight if self._forwarder is not None else 0

    async def start(self) -> None:
        check_dependencies()  # an unsupported aiohttp or httptools stops here, in one line
        config = self._config
        self._session = make_session(config)
        self._pool = UpstreamPool(config)
        try:
            self._forwarder = Forwarder(
                config, self._pool, credentials=self._credentials,
                observers=self._observers, logger=self._log,
            )
            self._server = InboundServer(
                self._forwarder,
                header_timeout=config.header_timeout,
                keepalive_timeout=config.keepalive_timeout,
                max_connections=_connection_cap(config.max_connections, self._log),
                log=self._log,
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
