"""The composition root: builds every part of one proxy and owns their lifecycles.

`AuthProxy` is the embedding API (an async context manager) and what the CLI runs.
Order matters and is kept here only: claim the workload name, start the credential
source, listen, say `running` (rule 1), start probes and the admin port; on the way
out say `stopping`, drain, close everything, say `stopped` (rule 8).
"""

from __future__ import annotations

import contextlib
import os
from types import TracebackType
from typing import Any

from .config import ProxyConfig
from .credentials import build_credential_source
from .credentials.base import CredentialSource
from .forwarding.listener import ForwardingServer
from .log import get_logger, redact_url
from .monitor.admin import AdminServer
from .monitor.auth import (
    AuthMonitor,
    ReauthorizedCallback,
    UnauthorizedCallback,
    UnauthorizedEvent,
)
from .monitor.health import HealthProber
from .monitor.metrics import Metrics
from .status import model as st
from .status.store import FileStore, StatusStore
from .status.workload import Workload


class _Reporter:
    """Buffers credential-source reports until the auth monitor may act on them.

    A source reports its first state while the workload is still `starting`; an
    episode it opens must begin after the status file can say `unauthenticated`.
    """

    def __init__(self) -> None:
        self._monitor: AuthMonitor | None = None
        self._last: tuple[bool, str, str, bool] | None = None
        self.health: HealthProber | None = None  # told when the source has a credential

    def __call__(self, available: bool, reason: str, message: str, permanent: bool) -> None:
        if self._monitor is None:
            self._last = (available, reason, message, permanent)
        else:
            self._monitor.credential_state(available, reason, message, permanent)
        if available and self.health is not None:
            self.health.credential_changed()  # a healed source is probed at once (rule 7)

    def attach(self, monitor: AuthMonitor) -> None:
        self._monitor = monitor
        if self._last is not None:
            monitor.credential_state(*self._last)
            self._last = None


class AuthProxy:
    """One running proxy in front of one remote MCP server."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        on_unauthorized: UnauthorizedCallback | None = None,
        on_reauthorized: ReauthorizedCallback | None = None,
        store: StatusStore | None = None,
    ) -> None:
        self.config = config
        self._logger = get_logger().bind(workload=config.workload)
        self._store: StatusStore = store or FileStore(config.state_path, config.workload)
        self._workload = Workload(self._store, logger=self._logger)
        self.metrics = Metrics()
        self._user_on_unauthorized = on_unauthorized
        self._credentials: CredentialSource | None = build_credential_source(
            config, refresh_listener=self._on_token_refresh
        )
        self._reporter = _Reporter()
        self._monitor = AuthMonitor(
            self._workload,
            mcp_path=config.mcp_path,
            credentials_configured=self._credentials is not None,
            current_version=self._current_version,
            on_unauthorized=self._on_unauthorized,
            on_reauthorized=on_reauthorized,
            logger=self._logger,
        )
        self._server = ForwardingServer(
            config,
            credentials=self._credentials,
            observers=[self._monitor, self.metrics],
            logger=self._logger,
        )
        self._health: HealthProber | None = None
        self._admin: AdminServer | None = None
        self._started = False
        self._stopping = False

    # --- public API ----------------------------------------------------------------

    @property
    def url(self) -> str:
        """The URL a client should use: the proxy's origin plus the target's path."""
        return self._server.url

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def admin_port(self) -> int | None:
        return self._admin.port if self._admin else None

    @property
    def status(self) -> st.WorkloadRecord:
        """The current status record (as last written to the status file)."""
        return self._workload.record

    @property
    def monitor(self) -> AuthMonitor:
        return self._monitor

    async def set_running(self) -> st.WorkloadRecord:
        """A runner saying "running": never overwrites `unauthenticated` (rule 3)."""
        return await self._workload.apply(st.Serving())

    async def start(self) -> None:
        config = self.config
        await self._workload.claim(
            st.Started(pid=os.getpid(), target_url=redact_url(config.target))
        )
        try:
            if self._credentials is not None:
                await self._credentials.start(self._reporter)
            await self._server.start()
            await self._workload.apply(st.Serving(proxy_url=self._server.url))
            self._reporter.attach(self._monitor)
            self.metrics.set_status(self._workload.record.status)
            if config.health_interval > 0:
                self._health = HealthProber(
                    config,
                    session=self._server.session,
                    credentials=self._credentials,
                    conditions=self._workload,
                    observer=self._monitor,
                    metrics=self.metrics,
                    logger=self._logger,
                    proof_wanted=lambda: self._monitor.episode_open,
                )
                self._reporter.health = self._health
                await self._health.start()
            if config.admin_port is not None:
                self._admin = AdminServer(
                    config,
                    status=lambda: self._workload.record.to_dict(),
                    ready=lambda: self._started and not self._stopping,
                    metrics=self.metrics,
                    logger=self._logger,
                )
                await self._admin.start()
        except BaseException as exc:
            await self._close_parts()
            with contextlib.suppress(Exception):
                await self._workload.apply(st.Failed(message=f"start failed: {exc}"))
            raise
        self._started = True
        self._logger.info("listening", url=self.url, target=redact_url(config.target))

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(Exception):
            await self._workload.apply(st.Stopping())
        await self._close_parts(drain=True)
        await self._monitor.flush()
        await self._workload.apply(st.Stopped())
        self._logger.info("stopped")

    async def __aenter__(self) -> AuthProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- internals -----------------------------------------------------------------

    def _on_token_refresh(self, outcome: str, expires_in: float | None) -> None:
        self.metrics.token_refresh(outcome)
        if outcome == "success":
            self.metrics.set_token_expiry(expires_in)

    def _current_version(self) -> int | None:
        return self._credentials.current_version if self._credentials else None

    async def _on_unauthorized(self, event: UnauthorizedEvent) -> None:
        self.metrics.episode_opened()
        if self._user_on_unauthorized is not None:
            result: Any = self._user_on_unauthorized(event)
            if result is not None:
                await result

    async def _close_parts(self, drain: bool = False) -> None:
        if self._health is not None:
            await self._health.stop()
        timeout = self.config.drain_timeout if drain else 0.0
        with contextlib.suppress(Exception):
            await self._server.shutdown(timeout)
        if self._credentials is not None:
            await self._credentials.close()
        if self._admin is not None:
            await self._admin.stop()
