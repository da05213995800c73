"""The streaming forwarding handler: checks, credential, upstream exchange, relay.

Its pure header/URL rules are in `rules.py`, the ways bodies cross in `relay.py`.
One request in, one request out (plus at most ten same-origin redirects and one
refresh-and-replay), bodies streamed both ways. This module is the one boundary where
the upstream pool's errors (`UpstreamError`, `OSError`, timeouts) and a malformed
request body become the proxy's own 400/502/504 answers. It must never log or keep a
credential, never send a credential to another origin than the target's, never buffer a
body whole (the replay copy is bounded by `replay_limit`), and never hold a stream to a
time limit once it started.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from typing import Any

from aiohttp import hdrs
from multidict import CIMultiDict
from yarl import URL

from ..config import ProxyConfig
from ..credentials.base import Credential, CredentialSource
from ..credentials.challenge import bearer_error
from ..errors import CredentialUnavailable
from ..log import AccessLog, get_logger
from ..wire.body import BadRequestBody
from ..wire.client import UpstreamError, UpstreamPool, UpstreamResponse
from ..wire.reply import HTTP10, Reply
from ..wire.server import InboundRequest, error_body
from .observe import Exchange, ForwardObserver
from .relay import (
    COMPLETE,
    PUSHED,
    REWRITTEN,
    BadHead,
    BodyTooLarge,
    EarlyReply,
    Progress,
    Pushed,
    RequestBody,
    client_headers,
    relay_path,
    send_complete,
)
from .rules import (
    ALLOWED_METHODS,
    REDIRECT_STATUSES,
    held_auth_answer,
    host_allowed,
    is_mcp_path,
    merge_query,
    origin_allowed,
    path_with_query,
    redirect_method,
    redirect_target,
    request_headers,
    split_raw_path,
    upstream_url,
)
from .sse import EndpointRewriter

_BODY_HEADERS = (hdrs.CONTENT_LENGTH, hdrs.CONTENT_TYPE, hdrs.TRANSFER_ENCODING,
                 hdrs.CONTENT_ENCODING)
MAX_REDIRECTS = 10
_NOT_FORWARDED = frozenset({hdrs.METH_TRACE, hdrs.METH_CONNECT})
_CACHE_LIMIT = 256  # distinct Origin/Host values remembered; more is an attack or a bug
_ENDPOINTS_KEPT = 64  # legacy `endpoint` paths remembered (one per server, in practice)


class _ProxyAnswer(Exception):
    """The proxy answers this request itself (403, 413, 421, 502, 503, 504)."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None, close: bool = False,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(code, message, **extra)
        self.headers = headers or {}
        self.close = close

    @classmethod
    def of(cls, status: int, body: bytes, headers: dict[str, str]) -> _ProxyAnswer:
        """An answer whose JSON body is already built."""
        answer = cls(status, "", "", headers)
        answer.body = body
        return answer


# --- the handler --------------------------------------------------------------------

class Forwarder:
    """The client protocol's handler: `await forwarder(request)` forwards one request."""

    def __init__(
        self,
        config: ProxyConfig,
        pool: UpstreamPool,
        *,
        credentials: CredentialSource | None = None,
        observers: Iterable[ForwardObserver] = (),
        logger: Any = None,
    ) -> None:
        self._config = config
        self._pool = pool
        # How many answers took each relay path (`relay.RELAY_PATHS`), for tests and
        # for anyone asking which path a kind of traffic takes.
        self.relay_counts: dict[str, int] = {COMPLETE: 0, PUSHED: 0, REWRITTEN: 0}
        self._credentials = credentials
        self._observers = tuple(observers)
        self._log = logger if logger is not None else get_logger()
        self._access = AccessLog(self._log)
        target = config.target
        self._target = target
        self._origin_url = target.origin()
        self._origin = str(self._origin_url)
        self._scheme = target.scheme
        # The proxy owns the credential: the target's challenge is not the client's to act on.
        self._hold_auth = credentials is not None and not config.pass_401
        self._mcp_path = config.mcp_path
        # Paths of the legacy transport's `endpoint` events, announced on an MCP path:
        # MCP paths too (an insertion-ordered set, oldest dropped first).
        self._endpoints: dict[str, None] = {}
        self._allowed_origins = config.allowed_origins
        self._allowed_hosts = config.allowed_hosts
        self._check_host = config.checks_host
        self._origin_ok: dict[str, bool] = {}
        self._host_ok: dict[str, bool] = {}
        self._timeout = config.response_timeout or None
        # The response-timeout guard: one coarse sweeper for all requests waiting for
        # headers instead of a timer per request (a timer per request costs a handle, a
        # heap push and a cancel each time).
        self._tick = min(1.0, (self._timeout or 1.0) / 8)
        self._deadlines: dict[asyncio.Task[Any], float] = {}  # in deadline order
        self._timed_out: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        """Requests being served now."""
        return len(self._tasks)

    async def wait_idle(self, limit: float) -> bool:
        """Wait until no request is in flight; False when `limit` seconds ran out first."""
        try:
            async with asyncio.timeout(limit):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def cancel_all(self) -> list[asyncio.Task[Any]]:
        """Cancel every request still in flight (after a drain ran out); returns them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks

    # The request's life: checks, credential, upstream exchange, streaming, accounting.
    async def __call__(self, request: InboundRequest) -> Reply:
        # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds, which
        # made most access-log durations 0.0 and metrics histograms useless.
        started = time.perf_counter()
        path, query = split_raw_path(request.raw_path)
        exchange = Exchange(method=request.method, path=path, on_mcp_path=self.is_mcp(path))
        progress = Progress()
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._idle.clear()
        try:
            try:
                return await self._forward(request, exchange, progress, query, task)
            except _ProxyAnswer as answer:
                return self._answer(request, exchange, progress, answer)
        finally:
            self._tasks.discard(task)
            if not self._tasks:
                self._idle.set()
            duration = time.perf_counter() - started
            self._complete(exchange, duration, progress)
            self._access(request.method, path, exchange.status, progress.upstream_status,
                         round(duration * 1000, 1), progress.bytes_out, request.remote)

    def _answer(self, request: InboundRequest, exchange: Exchange, progress: Progress,
                answer: _ProxyAnswer) -> Reply:
        exchange.status = answer.status
        exchange.upstream_headers = None
        progress.bytes_out = len(answer.body)
        response = Reply(answer.status, body=answer.body, content_type="application/json",
                         headers=CIMultiDict(answer.headers))
        if answer.close:
            response.force_close()
        return response

    def is_mcp(self, path: str) -> bool:
        """Is `path` an MCP path (the credential's only destination)?"""
        return path == self._mcp_path or is_mcp_path(path, self._mcp_path, self._endpoints)

    def _note_endpoint(self, url: str, stream: URL) -> None:
        """The target announced a legacy `endpoint` on an MCP path's event stream."""
        try:
            announced = stream.join(URL(url.strip(), encoded=True))
        except ValueError:
            return
        if announced.origin() != self._origin_url:
            return  # another origin: the credential never goes there anyway
        path = announced.raw_path
        self._endpoints.pop(path, None)
        self._endpoints[path] = None
        while len(self._endpoints) > _ENDPOINTS_KEPT:
            del self._endpoints[next(iter(self._endpoints))]

    def _check(self, request: InboundRequest) -> None:
        if request.version < HTTP10:
            # HTTP/0.9 has no headers, yet the parser reads some after a bare-LF request
            # line: a line break in the target would turn into a header upstream.
            raise _ProxyAnswer(505, "http_version_not_supported",
                               "HTTP/1.0 or HTTP/1.1 required", close=True)
        method = request.method
        if method in _NOT_FORWARDED:
            # TRACE would echo the injected credential back to the client; CONNECT asks
            # for a tunnel (whatever follows its head is not HTTP: close after the answer).
            raise _ProxyAnswer(405, "method_not_allowed", f"{method} is not forwarded",
                               headers={hdrs.ALLOW: ALLOWED_METHODS},
                               close=method == hdrs.METH_CONNECT)
        # Transfer codings other than chunked (501) and chunked from HTTP/1.0 (400) never
        # get here: `wire.server` refuses them as it parses the head.
        headers = request.headers
        if self._check_host:
            host = headers.get(hdrs.HOST)
            if host is not None:
                ok = self._host_ok.get(host)
                if ok is None:
                    ok = host_allowed(host, self._allowed_hosts)
                    if len(self._host_ok) < _CACHE_LIMIT:
                        self._host_ok[host] = ok
                if not ok:
                    raise _ProxyAnswer(421, "misdirected_request",
                                       "this proxy does not serve that Host")
        origins = headers.getall(hdrs.ORIGIN, ())
        if origins:
            if len(origins) > 1:
                raise _ProxyAnswer(403, "forbidden_origin", "more than one Origin header")
            origin = origins[0]
            ok = self._origin_ok.get(origin)
            if ok is None:
                ok = origin_allowed(origin, self._allowed_origins)
                if len(self._origin_ok) < _CACHE_LIMIT:
                    self._origin_ok[origin] = ok
            if not ok:
                raise _ProxyAnswer(403, "forbidden_origin", "Origin not allowed")
        length = request.content_length
        if length is not None and length > self._config.max_request_bytes:
            raise _ProxyAnswer(413, "payload_too_large",
                               f"request body above {self._config.max_request_bytes} bytes",
                               close=True)

    async def _credential(self) -> Credential | None:
        assert self._credentials is not None
        try:
            return await self._credentials.get()
        except CredentialUnavailable as exc:
            retry = max(1, math.ceil(exc.retry_after))
            raise _ProxyAnswer(503, "credential_unavailable", exc.message,
                               headers={hdrs.RETRY_AFTER: str(retry)},
                               reason=exc.reason) from None

    async def _forward(self, request: InboundRequest, exchange: Exchange, progress: Progress,
                       query: str, task: asyncio.Task[Any]) -> Reply:
        self._check(request)
        source = self._credentials
        credential = None
        # The one place that decides injection: the configured credential goes on MCP
        # paths only; elsewhere nothing is injected and, when a source is configured,
        # the client's own Authorization is not passed on either.
        if source is not None and exchange.on_mcp_path:
            credential = source.ready()
            if credential is None:
                credential = await self._credential()
        if exchange.path == self._mcp_path:
            query = merge_query(query, self._target)
        path_qs = path_with_query(exchange.path, query)
        headers = request_headers(
            request.headers, client_ip=request.remote or "", target_scheme=self._scheme,
            authorization=credential.authorization if credential is not None else None,
            client_authorization=source is None,
        )
        body = (RequestBody(request, limit=self._config.max_request_bytes,
                            keep=self._config.replay_limit)
                if request.body_exists else None)
        early = EarlyReply(request, progress,
                           refreshable=source is not None and source.can_refresh,
                           hold_auth=self._hold_auth and exchange.on_mcp_path)
        upstream = await self._exchange(request.method, path_qs, headers, body, credential,
                                        exchange, task, early)
        try:
            if source is not None and upstream.status in (401, 403) and self._hold_auth \
                    and exchange.on_mcp_path:
                self._hold_auth_answer(upstream, exchange, progress, source)
            return await self._relay(request, upstream, exchange, progress, early)
        finally:
            # Normal end: the connection goes back to the pool; anything else closes it,
            # so a cancelled stream frees the target's side at once.
            upstream.release()

    async def _send(self, method: str, path_qs: str, headers: CIMultiDict[str],
                    data: Any, body: RequestBody | None, current: asyncio.Task[Any],
                    early: EarlyReply) -> UpstreamResponse:
        """One upstream request up to its response headers; foreign errors end here."""
        task = self._watch(current) if self._timeout is not None else None
        try:
            return await self._pool.request(method, path_qs, headers, data, early)
        except asyncio.CancelledError:
            if task is not None and task in self._timed_out:
                self._timed_out.discard(task)
                if task.uncancel() == 0:  # our cancel only, not the client's hang-up too
                    raise _ProxyAnswer(504, "gateway_timeout",
                                       "the target sent no response headers in time"
                                       ) from None
            raise
        except BadRequestBody:
            raise _ProxyAnswer(400, "bad_request", "the request body's framing is malformed",
                               close=True) from None
        except (UpstreamError, OSError, BodyTooLarge) as exc:
            if body is not None and body.too_large:
                raise _ProxyAnswer(
                    413, "payload_too_large",
                    f"request body above {self._config.max_request_bytes} bytes", close=True,
                ) from None
            raise _ProxyAnswer(502, "bad_gateway",
                               f"the target could not be reached ({type(exc).__name__})"
                               ) from None
        except ValueError:
            # A header that cannot be sent safely (a control character from a credential).
            raise _ProxyAnswer(502, "bad_gateway", "the request head cannot be sent"
                               ) from None
        finally:
            if task is not None:
                self._deadlines.pop(task, None)
                if task in self._timed_out:  # our cancel surfaced as another error
                    self._timed_out.discard(task)
                    task.uncancel()

    def _watch(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Put the request's task under the response timeout until `_send` returns."""
        loop = task.get_loop()
        assert self._timeout is not None
        self._deadlines.pop(task, None)  # keep the dict in deadline order
        self._deadlines[task] = loop.time() + self._timeout
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._tick, self._sweep)
        return task

    def _sweep(self) -> None:
        """Cancel the requests whose target sent no headers within `response_timeout`."""
        self._sweeper = None
        deadlines = self._deadlines
        loop = asyncio.get_running_loop()
        now = loop.time()
        expired = []
        for task, deadline in deadlines.items():
            if deadline > now:
                break
            expired.append(task)
        for task in expired:
            del deadlines[task]
            self._timed_out.add(task)
            task.cancel()
        if deadlines:
            self._sweeper = loop.call_later(self._tick, self._sweep)

    async def _exchange(self, method: str, path_qs: str, headers: CIMultiDict[str],
                        body: RequestBody | None, credential: Credential | None,
                        exchange: Exchange, task: asyncio.Task[Any],
                        early: EarlyReply) -> UpstreamResponse:
        """Send, following same-origin redirects and one refresh-and-replay."""
        started = time.perf_counter()
        data: Any = None
        if body is not None:
            data = body.complete()
            if data is None:
                data = body.stream()
        redirects = 0
        replayed = False
        upstream: UpstreamResponse | None = None
        try:
            while True:
                # An answer `early` sent is never one the steps below act on (no redirect,
                # no refreshable 401): the loop ends with it.
                upstream = await self._send(method, path_qs, headers, data, body, task, early)
                status = upstream.status
                nxt = (redirect_target(status, upstream.headers.get(hdrs.LOCATION),
                                       upstream_url(self._origin, path_qs), self._origin_url)
                       if status in REDIRECT_STATUSES and redirects < MAX_REDIRECTS else None)
                if nxt is not None:
                    new_method, keep_body = redirect_method(status, method)
                    replay: bytes | None = None
                    if keep_body and body is not None:
                        replay = await body.replay()
                        if replay is None:
                            break  # too large to send again: the client gets the redirect
                    upstream.release()
                    if not keep_body and body is not None:
                        headers = headers.copy()
                        for name in _BODY_HEADERS:
                            headers.popall(name, None)
                        body.drop()
                        body = None
                    method, path_qs, data = new_method, nxt.raw_path_qs, replay
                    redirects += 1
                    exchange.on_mcp_path = self.is_mcp(nxt.raw_path)
                    credential = self._hop_credential(headers, exchange.on_mcp_path,
                                                      credential)
                    continue
                source = self._credentials
                if status == 401 and source is not None and credential is not None and not replayed:
                    fresh = await source.after_unauthorized(credential)
                    if source.can_refresh and fresh is not None:
                        replay = await body.replay() if body is not None else None
                        if body is None or replay is not None:
                            upstream.release()
                            credential = fresh
                            headers = headers.copy()
                            headers[hdrs.AUTHORIZATION] = fresh.authorization
                            data = replay
                            replayed = True
                            continue
                break
        except BaseException:
            if upstream is not None:
                upstream.close()  # a redirect/replay step failed: free the connection
            raise
        if body is not None:
            body.drop()
        exchange.credential = credential
        exchange.upstream_seconds = time.perf_counter() - started
        return upstream

    def _hold_auth_answer(self, upstream: UpstreamResponse, exchange: Exchange, progress: Progress,
                          source: CredentialSource) -> None:
        """Raise the proxy's own answer in place of the target's 401 / 403
        `insufficient_scope` (see `held_auth_answer`); observers still hear the target's."""
        challenge = bearer_error(upstream.headers.getall(hdrs.WWW_AUTHENTICATE, ()))
        held = held_auth_answer(upstream.status, challenge, self._config.workload, source.fix)
        if held is None:
            return
        status, headers, body = held
        progress.upstream_status = upstream.status
        exchange.status = upstream.status
        exchange.upstream_headers = upstream.headers
        self._respond(exchange)  # the auth monitor opens the episode on the target's answer
        raise _ProxyAnswer.of(status, body, headers)

    def _hop_credential(self, headers: CIMultiDict[str], on_mcp_path: bool,
                        credential: Credential | None) -> Credential | None:
        """Set the credential for a followed redirect, in place: on an MCP path only.

        A redirect from elsewhere onto an MCP path gets the credential at hand, if any
        (no waiting mid-redirect); without one it goes on bare and proves nothing.
        """
        if self._credentials is None:
            return None
        if on_mcp_path and credential is None:
            credential = self._credentials.ready()
        if not on_mcp_path or credential is None:
            headers.popall(hdrs.AUTHORIZATION, None)
            return None
        headers[hdrs.AUTHORIZATION] = credential.authorization
        return credential

    async def _relay(self, request: InboundRequest, upstream: UpstreamResponse,
                     exchange: Exchange, progress: Progress, early: EarlyReply) -> Reply:
        """The target's answer to the client, by the one path `relay_path` chose (started
        from the socket callback by `early` when it could)."""
        status = upstream.status
        progress.upstream_status = status
        exchange.status = status
        exchange.upstream_headers = upstream.headers
        exchange.sse = upstream.headers.get(hdrs.CONTENT_TYPE, "").startswith(
            "text/event-stream")
        path = early.path
        try:
            if path is None:
                path = relay_path(request.method, upstream)
                if path == COMPLETE:
                    reply = send_complete(request, upstream, progress)
                elif path == PUSHED:
                    pushed = Pushed.start(request, upstream, progress)
                    early.pushed, reply = pushed, pushed.reply
            elif path == COMPLETE:
                assert early.reply is not None
                reply = early.reply
        except BadHead:
            exchange.status = 502
            raise _ProxyAnswer(502, "bad_gateway", "the target's response head is malformed",
                               close=True) from None
        except ConnectionError:
            request.protocol.force_close()  # the client left: nothing more to send
            gone = Reply(status)
            gone.prepared = gone.finished = True
            return gone
        self.relay_counts[path] += 1
        if path == COMPLETE:
            self._respond(exchange)  # off the latency: the answer is already out
            return reply
        self._respond(exchange)  # a stream is counted open before it streams
        if path == PUSHED:
            assert early.pushed is not None
            await early.pushed.done
            return early.pushed.reply
        return await self._rewritten(request, upstream, exchange, progress)

    async def _rewritten(self, request: InboundRequest, upstream: UpstreamResponse,
                         exchange: Exchange, progress: Progress) -> Reply:
        """Path `rewritten`: the awaited loop through the endpoint rewriter."""
        reply = Reply(upstream.status, upstream.reason, client_headers(upstream, REWRITTEN))
        try:
            reply.start(request)
        except ValueError:
            raise _ProxyAnswer(502, "bad_gateway", "the target's response head is malformed",
                               close=True) from None
        stream_url = upstream_url(self._origin, exchange.path)
        rewriter: EndpointRewriter | None = EndpointRewriter(
            self._origin_url, f"http://{request.host}",
            on_endpoint=(lambda url: self._note_endpoint(url, stream_url))
            if exchange.on_mcp_path else None)
        try:
            while True:
                try:
                    chunk = await upstream.read()
                except UpstreamError:
                    # The target died mid-stream: drop the client's connection without the
                    # last chunk, so it sees an error rather than a clean (truncated) end.
                    request.protocol.force_close()
                    return reply
                if not chunk:
                    break
                if rewriter is not None:
                    chunk = rewriter.feed(chunk)
                    if rewriter.passthrough:
                        rewriter = None  # nothing left to look at: the plain path from here on
                    if not chunk:
                        continue
                await reply.write(chunk)
                progress.bytes_out += len(chunk)
            if rewriter is not None:
                tail = rewriter.flush()
                if tail:
                    await reply.write(tail)
                    progress.bytes_out += len(tail)
            await reply.write_eof()
        except ConnectionError:
            # The client hung up while we wrote to it: end quietly (counted as the
            # premature disconnection it is, no traceback for every client that leaves).
            request.protocol.force_close()
        return reply

    # Observers are sync and cheap, but never trusted to not raise.
    def _respond(self, exchange: Exchange) -> None:
        for observer in self._observers:
            try:
                observer.on_response(exchange)
            except Exception:
                self._log.exception("observer_failed", observer=type(observer).__name__)

    def _complete(self, exchange: Exchange, duration: float, progress: Progress) -> None:
        for observer in self._observers:
            try:
                observer.on_complete(exchange, duration, progress.bytes_out)
            except Exception:
                self._log.exception("observer_failed", observer=type(observer).__name__)
