"""What many test files share and a fixture cannot give: the wait bounds, one bounded
polling helper, the chunked framing of a test body, a secret file written as a user
writes it, the raw-socket upstream behind the `raw_upstream` fixture (tests/conftest.py),
a uvicorn server for ASGI targets, and `Started`, for fixtures that start servers on
demand and stop them at teardown.

Import it by name (`from helpers import WAIT, eventually`): pytest puts `tests/` on
`sys.path` (tests/ has a conftest.py and no `__init__.py`), so this works from every
folder below it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import AuthProxy, ReauthorizedEvent, UnauthorizedEvent, WorkloadStatus
from proxy.credentials.base import CredentialSource
from proxy.forwarding.listener import ForwardingServer
from proxy.forwarding.observe import ForwardObserver

if TYPE_CHECKING:
    from starlette.types import ASGIApp

# Bounds on every wait. Never reached when things work: the happy path takes milliseconds.
WAIT = 5.0  # an event in this process (a request, a callback, a file the proxy writes)
LONG_WAIT = 10.0  # another process or a real SDK on the far side (startup, drain, a hook)
SLOW_WAIT = 30.0  # a process under load, or a stream that must stay open that long

T = TypeVar("T")


# The value returned is the predicate's first true one, so never None: `T | None` lets a
# predicate that answers "not yet" with None type its result without an assert.
@overload
async def eventually(predicate: Callable[[], Awaitable[T | None]], within: float = WAIT, *,
                     what: str = "", every: float = 0.01) -> T: ...
@overload
async def eventually(predicate: Callable[[], T | None], within: float = WAIT, *,
                     what: str = "", every: float = 0.01) -> T: ...
async def eventually(predicate: Callable[[], object], within: float = WAIT, *,
                     what: str = "", every: float = 0.01) -> object:
    """Poll `predicate` (plain or async) until it gives a true value, and return that value;
    raise AssertionError naming what was awaited if `within` seconds pass first.

    Only for state nothing signals (a file watcher, another process, a counter in the
    code under test): where there is an event, wait on the event.
    """
    try:
        async with asyncio.timeout(within) as bound:
            while True:
                value = predicate()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return value
                await asyncio.sleep(every)
    except TimeoutError:
        if not bound.expired():
            raise
        raise AssertionError(
            f"not true within {within} s: {what or _describe(predicate)}") from None


def _describe(predicate: Callable[..., object]) -> str:
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return getattr(predicate, "__qualname__", repr(predicate))


def status_now(proxy: AuthProxy) -> WorkloadStatus:
    """`proxy`'s workload status read afresh; a call, so that a type checker does not carry
    an earlier assert's narrowing over the awaits during which the status changes."""
    return proxy.status.status


def write_secret(path: Path, value: str) -> Path:
    """Writes a secret file the way a user would (mode 0600, trailing newline)."""
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def answering(text: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An upstream handler that answers every request 200 with `text`."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=text)

    return handler


async def run_cli(args: Sequence[str], env: Mapping[str, str] | None = None,
                  timeout: float = 30) -> tuple[int, str, str]:
    """`python -m proxy ARGS` run to its end with `env` (None: this process's), killed if
    it outlives `timeout`: its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def chunk(data: bytes) -> bytes:
    """`data` as one chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def unchunk(framed: bytes) -> bytes:
    """The payload of chunks (up to the last chunk, which may be left off), checked
    strictly here: a size line, the data, CRLF, with nothing of the proxy's code."""
    data, pos = framed + b"0\r\n\r\n", 0
    out: list[bytes] = []
    while True:
        cut = data.index(b"\r\n", pos)
        size = int(data[pos:cut].split(b";", 1)[0], 16)
        if not size:
            return b"".join(out)
        out.append(data[cut + 2:cut + 2 + size])
        assert data[cut + 2 + size:cut + 4 + size] == b"\r\n", "chunk data not ended by CRLF"
        pos = cut + 4 + size


class RawConn:
    """One connection to a `raw_upstream`: its streams, its number (1, 2, ...) and the
    head of the request last read on it."""

    def __init__(self, upstream: RawUpstream, number: int,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.upstream = upstream
        self.number = number
        self.reader = reader
        self.writer = writer
        self.head = b""

    @property
    def path(self) -> str:
        return self.head.split(b" ", 2)[1].decode("latin-1") if self.head else ""

    async def read_head(self) -> bytes:
        """The next request's head (raises IncompleteReadError once the proxy closes)."""
        self.head = await self.reader.readuntil(b"\r\n\r\n")
        self.upstream.requests.append(self.head)
        self.upstream.changed.set()
        return self.head

    async def read_request(self) -> bytes:
        """The next request's head and its Content-Length body, as one bytes."""
        await self.read_head()
        length = 0
        for line in self.head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = self.head + await self.reader.readexactly(length)
        self.upstream.requests[-1] = request
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock: socket.socket = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def wait_closed_by_peer(self) -> None:
        """Return once the proxy's side of this connection is gone (EOF or reset)."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass


RawServe = Callable[[RawConn], Awaitable[None]]


class RawUpstream:
    """A loopback target on raw asyncio streams: `serve(conn)` runs once per connection
    and writes exactly what the test wants; the connection is closed when it returns.
    Counts connections (and those still open) and records every request head it read."""

    def __init__(self, serve: RawServe) -> None:
        self.serve = serve
        self.port = 0
        self.connections = 0
        self.open = 0
        self.requests: list[bytes] = []
        self.changed = asyncio.Event()  # set on every connection, request and close
        self.tasks: set[asyncio.Task[None]] = set()

    def url(self, path: str = "/mcp") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate` holds, checked on each change; bounded by WAIT."""
        async with asyncio.timeout(WAIT):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        self.open += 1
        self.changed.set()
        try:
            await self.serve(RawConn(self, self.connections, reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.open -= 1
            self.changed.set()
            self.tasks.discard(task)


# The types of tests/conftest.py's factory fixtures, for the tests that take them.
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class UpstreamFactory(Protocol):
    """`make_upstream`: a loopback aiohttp upstream answering every request with `handler`."""

    def __call__(self, handler: Handler, **server_kwargs: Any) -> Awaitable[TestServer]: ...


class ProxyFactory(Protocol):
    """`make_proxy`: a started `ForwardingServer` for `target_url`, `config` passed to
    `ProxyConfig` (shortened tunables)."""

    def __call__(self, target_url: str, *, credentials: CredentialSource | None = None,
                 observers: Iterable[ForwardObserver] = (),
                 **config: Any) -> Awaitable[ForwardingServer]: ...


RawUpstreamFactory = Callable[[RawServe], Awaitable[RawUpstream]]  # `raw_upstream`


class Episodes:
    """The proxy's `on_unauthorized` / `on_reauthorized` callbacks, kept, and as events a
    test can wait for (an episode opened, an episode closed)."""

    def __init__(self) -> None:
        self.opened, self.closed = asyncio.Event(), asyncio.Event()
        self.unauthorized: list[UnauthorizedEvent] = []
        self.reauthorized: list[ReauthorizedEvent] = []

    def on_unauthorized(self, event: UnauthorizedEvent) -> None:
        self.unauthorized.append(event)
        self.opened.set()

    def on_reauthorized(self, event: ReauthorizedEvent) -> None:
        self.reauthorized.append(event)
        self.closed.set()


class UvicornServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in this test's event loop.

    The port is bound at once, so an app that must know its own URL can be built after
    this and handed to `start`.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, app: ASGIApp) -> None:
        import uvicorn  # only the suites with ASGI targets install it

        self._server = server = uvicorn.Server(uvicorn.Config(
            app, log_config=None, log_level="warning", access_log=False, lifespan="on",
            ws="none", timeout_graceful_shutdown=2))
        self._task = task = asyncio.create_task(server.serve(sockets=[self._sock]))

        def started() -> bool:
            # uvicorn has no startup event to await; its `started` flag is the signal.
            if task.done():
                task.result()
                raise RuntimeError("uvicorn exited during startup")
            return bool(server.started)

        await eventually(started, LONG_WAIT, what="uvicorn to start")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), LONG_WAIT)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        finally:
            self._sock.close()


class Stoppable(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


S = TypeVar("S", bound=Stoppable)


class Started:
    """What a fixture started on demand, stopped last first when its `async with` ends:
    `async with Started() as started: yield lambda: started.start(Server(...))`."""

    def __init__(self) -> None:
        self.servers: list[Stoppable] = []

    async def start(self, server: S) -> S:
        await server.start()
        self.servers.append(server)
        return server

    async def __aenter__(self) -> Started:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in reversed(self.servers):
            await server.stop()
