"""The composition root: builds every part of one proxy and owns their lifecycles.

`AuthProxy` is the embedding API (an async context manager) and what the CLI runs.
Order matters and is kept here only: claim the workload name, start the credential
source, listen, say `running` (rule 1), start probes and the admin port; on the way
out say `stopping`, drain, close everything, say `stopped` (rule 8).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from types import TracebackType
from typing import Any

from .config import ProxyConfig, parse_store, redact_store_url
from .credentials import build_credential_source
from .credentials.base import TOKEN_LOADED, CredentialSource
from .credentials.oauth import OAuthSource
from .credentials.token_store import TokenStore
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


def _build_store(config: ProxyConfig, logger: Any) -> StatusStore:
    """The file under --state-dir, or the shared record in Redis (`--store redis://`)."""
    if not config.shared_store:
        return FileStore(config.state_path, config.workload)
    from .status.redis import RedisStore  # the optional extra `redis`, only when asked for

    return RedisStore(parse_store(config.store), config.workload,
                      replica_ttl=config.replica_ttl, logger=logger)


def _build_token_store(config: ProxyConfig, store: StatusStore) -> TokenStore | None:
    """With a redis store and an OAuth source: the tokens live in the store, encrypted."""
    if not config.shared_store or config.credential_kind not in ("oauth", "signin"):
        return None
    from .credentials.token_store import RedisTokenStore, read_key
    from .status.redis import RedisStore

    assert isinstance(store, RedisStore)
    assert config.store_key_file is not None
    # `--oauth`: the sign-in `login --store` put there names its own issuer.
    issuer = config.oauth_token_url if config.credential_kind == "oauth" else None
    return RedisTokenStore(
        store.client, workload=config.workload, origin=str(config.target.origin()),
        issuer=issuer, key=read_key(config.store_key_file),
        lease=config.credential_wait, display=store.location.display)


def _wake_on_recovery(store: StatusStore, credentials: CredentialSource | None) -> None:
    """An OAuth refresh held up by a lost store runs as soon as the store is back."""
    recovered = getattr(store, "recovered", None)  # a RedisStore's listeners
    if recovered is not None and isinstance(credentials, OAuthSource):
        recovered.append(credentials.store_recovered)


STORE_KEY_MISMATCH = "StoreKeyMismatch"


class _Reporter:
    """Buffers credential-source reports until the auth monitor may act on them.

    A source reports its first state while the workload is still `starting`; an
    episode it opens must begin after the status file can say `unauthenticated`.
    """

    def __init__(self, workload: Workload) -> None:
        self._workload = workload
        self._monitor: AuthMonitor | None = None
        self._last: tuple[bool, str, str, bool] | None = None
        self.health: HealthProber | None = None  # told when the source has a credential

    def __call__(self, available: bool, reason: str, message: str, permanent: bool) -> None:
        if reason == STORE_KEY_MISMATCH:
            # Not this replica's tokens, or not its key: it writes nothing more to the
            # shared store (no episode, no status) and says `error` itself.
            self._workload.detach(st.Failed(message=message, reason=reason))
            return
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
        self._store: StatusStore = store or _build_store(config, self._logger)
        self._workload = Workload(self._store, logger=self._logger)
        self.metrics = Metrics()
        self._user_on_unauthorized = on_unauthorized
        self._credentials: CredentialSource | None = build_credential_source(
            config, refresh_listener=self._on_token_refresh,
            token_store=_build_token_store(config, self._store),
        )
        self._reporter = _Reporter(self._workload)
        _wake_on_recovery(self._store, self._credentials)
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
            if self._workload.shared:
                self._workload.start_sync(min(1.0, config.replica_ttl / 3))
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
        self._logger.info("listening", url=self.url, target=redact_url(config.target),
                          store=redact_store_url(config.store))

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(Exception):
            await self._workload.apply(st.Stopping())
        await self._close_parts(drain=True)
        if self._workload.shared:
            # A store that is down must not keep the process from exiting: what it has
            # not taken by now is lost with this replica, whose entry expires anyway.
            if not self._workload.store_down:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._monitor.flush(self.config.drain_timeout),
                                           self.config.drain_timeout)
        else:
            await self._monitor.flush(self.config.drain_timeout)
        await self._monitor.close()  # callbacks still running end with the proxy
        stopped = asyncio.ensure_future(self._workload.apply(st.Stopped()))
        if self._workload.shared:
            # The goodbye is best effort: without it the entry expires after replica_ttl.
            await asyncio.wait([stopped], timeout=self.config.drain_timeout)
            if not stopped.done():
                self._logger.warning("store_goodbye_unsent", store=redact_store_url(
                    self.config.store))
                stopped.cancel()
        else:
            await stopped
        await self._workload.close()
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
        if outcome != TOKEN_LOADED:  # a stored sign-in's token: no refresh happened
            self.metrics.token_refresh(outcome)
        if outcome in ("success", TOKEN_LOADED):
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
