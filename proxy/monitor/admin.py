"""The admin port: `/healthz`, `/readyz`, `/status` and `/metrics` (`--admin-port`).

A separate listener from the proxy, so the proxied path space stays transparent: no
path of the target is ever shadowed by one of ours. `/readyz` answers whether the
proxy accepts connections, whatever the auth state (a revoked token is not a reason to
restart or unroute the proxy: it is what `/status` is for).

It must never expose a credential (the status callable returns the status file's
object, which never holds one), never write anything, and never log per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import hdrs, web

from ..config import ProxyConfig
from ..forwarding.rules import host_allowed, origin_allowed
from ..log import get_logger
from ..status.model import WorkloadStatus
from .metrics import CONTENT_TYPE, Metrics

_NO_STORE = {hdrs.CACHE_CONTROL: "no-store"}


def _json(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers=_NO_STORE)


def _refresh_status(metrics: Metrics, status: Callable[[], dict[str, Any]]) -> None:
    # The status changes in the status file, not through Metrics: read it at scrape time
    # so the gauge is never stale, whoever changed it (this process or another).
    try:
        current = WorkloadStatus(str(status().get("status")))
    except (ValueError, TypeError, AttributeError):
        return
    metrics.set_status(current)


def build_app(
    *, status: Callable[[], dict[str, Any]], ready: Callable[[], bool], metrics: Metrics,
    config: ProxyConfig | None = None,
) -> web.Application:
    """The admin routes as an aiohttp application (testable without a port).

    With `config`, the proxy port's DNS-rebinding guards apply here too: a web page must
    not read `/status` through a rebound host name (421) or from a foreign Origin (403).
    """

    async def healthz(_request: web.Request) -> web.Response:
        # Answering at all is the proof of life.
        return _json({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        if ready():
            return _json({"ready": True})
        return _json({"ready": False}, status=503)

    async def status_view(_request: web.Request) -> web.Response:
        return _json(status())

    async def metrics_view(_request: web.Request) -> web.Response:
        _refresh_status(metrics, status)
        return web.Response(body=metrics.render(),
                            headers={hdrs.CONTENT_TYPE: CONTENT_TYPE, **_NO_STORE})

    middlewares = [_guard(config)] if config is not None else []
    app = web.Application(middlewares=middlewares)
    # add_get also answers HEAD, which load balancers like to probe with.
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status_view)
    app.router.add_get("/metrics", metrics_view)
    return app


def _guard(config: ProxyConfig) -> Any:
    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        origins = request.headers.getall(hdrs.ORIGIN, [])
        if len(origins) > 1 or (origins and not origin_allowed(origins[0],
                                                                config.allowed_origins)):
            return _json({"error": "forbidden_origin",
                          "message": "this Origin may not use the admin port"}, status=403)
        if config.admin_checks_host and not host_allowed(request.headers.get(hdrs.HOST, ""),
                                                      config.allowed_hosts):
            return _json({"error": "misdirected_request",
                          "message": "the admin port does not serve that Host"}, status=421)
        response: web.StreamResponse = await handler(request)
        return response

    return guard


class AdminServer:
    """The admin listener on `config.admin_host:config.admin_port` (0: a free port).

    It binds `admin_host` (loopback by default), never the proxy's `--host`: a proxy
    bound to every interface must not hand `/status` and `/metrics` to the network
    unless the user asked for it.
    """

    def __init__(
        self,
        config: ProxyConfig,
        *,
        status: Callable[[], dict[str, Any]],
        ready: Callable[[], bool],
        metrics: Metrics,
        logger: Any = None,
    ) -> None:
        self._config = config
        self._app = build_app(status=status, ready=ready, metrics=metrics, config=config)
        self._log = logger or get_logger()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port; only valid after `start()`."""
        if self._port is None:
            raise RuntimeError("the admin server is not started")
        return self._port

    @property
    def url(self) -> str:
        host = self._config.admin_host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        # Scrapers poll every few seconds: an access log would drown the proxy's own.
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._config.admin_host, self._config.admin_port or 0)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self._log.info("admin_listening", host=self._config.admin_host, port=self._port,
                       url=self.url)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
