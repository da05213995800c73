"""The auth monitor: turns the target's answers into auth episodes, status and callbacks.

`AuthMonitor` watches every final response (it is a `ForwardObserver`) and every
credential-source report (it is a `CredentialReporter`). An unauthorized episode opens
on the first 401 on an MCP path (or an invalid source) while none is open and closes on
proof that the current credential works (contract rules 2-5, "Auth episodes"). Episodes are
decided synchronously in memory, so any number of concurrent 401s open exactly one.

It must never do I/O or block on the request path: status writes go through
`Workload`'s ordered writer, and callbacks run as their own tasks, each only after
the status file says what it announces. A callback's failure is logged, never raised
into forwarding. Nothing here logs or passes on a credential.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import hdrs

from ..credentials.challenge import BearerError, bearer_error
from ..forwarding.observe import Exchange
from ..log import get_logger, mask_known_secrets, redact_text, register_secret
from ..status import model as st
from ..status.workload import Workload

UNAUTHORIZED_REASON = "UpstreamUnauthorized"
INSUFFICIENT_SCOPE_REASON = "InsufficientScope"
RETRYING_REASON = "TokenRefreshRetrying"
CALLBACK_GRACE = 10.0  # seconds `flush` waits for callbacks before leaving them running
# How long a cancelled callback may take to clean up (an exec hook: SIGTERM, SIGKILL 2 s on).
STOP_GRACE = 3.0
_MAX_ERROR_TEXT = 200  # the target's error text is untrusted: bound what we store
# (reason, message) of the conditions a good answer on the MCP path sets.
_AUTHORIZED = ("Authorized", "The target accepts requests on the MCP path.")
_ACCEPTED = ("CredentialAccepted", "The target accepted the credential on the MCP path.")


@dataclass(frozen=True, slots=True)
class UnauthorizedEvent:
    """An unauthorized episode began. status_code/method/path are None for a source failure."""

    workload: str
    status_code: int | None
    method: str | None
    path: str | None
    reason: str
    message: str
    www_authenticate: str | None
    error: str | None
    error_description: str | None
    resource_metadata: str | None
    at: datetime

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = st.format_time(self.at)
        return {"type": "unauthorized", **data}


@dataclass(frozen=True, slots=True)
class ReauthorizedEvent:
    """An unauthorized episode ended on proof that the credential works again."""

    workload: str
    at: datetime
    unauthorized_since: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"type": "reauthorized", "workload": self.workload,
                "at": st.format_time(self.at),
                "unauthorized_since": st.format_time(self.unauthorized_since)}


class UnauthorizedCallback(Protocol):
    def __call__(self, event: UnauthorizedEvent, /) -> Awaitable[None] | None: ...


class ReauthorizedCallback(Protocol):
    def __call__(self, event: ReauthorizedEvent, /) -> Awaitable[None] | None: ...


# --- pure helpers ---------------------------------------------------------------------


def _clean(text: str | None, limit: int = _MAX_ERROR_TEXT) -> str | None:
    """Untrusted header text made safe for a one-line message: printable, short, redacted."""
    if not text:
        return None
    printable = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    if len(printable) > limit:
        printable = printable[: limit - 1] + "…"
    return redact_text(printable) or None


def _note_sent_secret(ex: Exchange) -> None:
    """Register the credential a 401/403 answered, so an echo of it is masked everywhere.

    A target can only quote back what it was sent; doing this on the rare 401/403 path
    keeps the per-request path free of it.
    """
    if ex.credential is not None:
        scheme, _, token = ex.credential.authorization.partition(" ")
        register_secret(token or scheme)


def unauthorized_message(status_code: int, error: BearerError) -> str:
    """`target answered 401 (invalid_token: The access token expired)`, as the contract shows."""
    code, description = _clean(error.error, 64), _clean(error.error_description)
    if code and description:
        return f"target answered {status_code} ({code}: {description})"
    if code or description:
        return f"target answered {status_code} ({code or description})"
    return f"target answered {status_code}"


def scope_message(error: BearerError) -> str:
    scope = _clean(error.scope)
    needed = f"; it asks for scope {scope!r}" if scope else ""
    return f"target answered 403 insufficient_scope{needed}"


# --- the monitor ----------------------------------------------------------------------


class AuthMonitor:
    """Auth episodes of one workload: a `ForwardObserver` and a `CredentialReporter`."""

    def __init__(
        self,
        workload: Workload,
        *,
        mcp_path: str,
        credentials_configured: bool,
        current_version: Callable[[], int | None],
        on_unauthorized: UnauthorizedCallback | None = None,
        on_reauthorized: ReauthorizedCallback | None = None,
        logger: Any = None,
    ) -> None:
        self._workload = workload
        self._mcp_path = mcp_path
        self._credentials_configured = credentials_configured
        self._current_version = current_version
        self._on_unauthorized = on_unauthorized
        self._on_reauthorized = on_reauthorized
        self._logger = logger if logger is not None else get_logger().bind(
            workload=workload.name)
        self.episode_open = False
        self.unauthorized_since: datetime | None = None
        # Set once this episode's on_unauthorized was invoked: on_reauthorized never
        # overtakes the announcement of the episode it ends.
        self._announced: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # The workload view in which a good MCP answer changes nothing (`_note_settled`).
        self._settled: st.WorkloadRecord | None = None
        # Each open/close decision carries a token; the store's answer says whose flip
        # landed. With a shared store another replica may have decided first.
        self._tokens = (f"{os.getpid()}-{id(self):x}-{n}" for n in itertools.count())
        if workload.shared:
            workload.listeners.append(self._adopt)

    # --- ForwardObserver ----------------------------------------------------------

    def on_response(self, ex: Exchange) -> None:
        status = ex.status
        if ex.upstream_headers is None or status < 100 or not ex.on_mcp_path:
            # The proxy's own answer, or one from a path the credential never goes to:
            # neither says anything about the credential (a 401 from an admin area
            # must not open episodes any local client could then flip).
            return
        if status < 400:
            if self._workload.view is self._settled or ex.method == hdrs.METH_OPTIONS:
                return  # nothing that could change; a preflight says nothing either
            self._workload.set_condition(st.ConditionType.AUTHORIZED, True, *_AUTHORIZED)
            if self._proves(ex):
                self._close_episode()
            self._note_settled()
        elif status == 401:
            self._unauthorized(ex)
        elif status == 403:
            self._forbidden(ex)

    def on_complete(self, ex: Exchange, duration: float, bytes_out: int) -> None:
        return None

    # --- CredentialReporter -------------------------------------------------------

    def credential_state(self, available: bool, reason: str, message: str,
                         permanent: bool) -> None:
        kind = st.ConditionType.CREDENTIAL_AVAILABLE
        if available:
            # The episode stays open: only a proof (rule 4) ends it.
            self._workload.set_condition(kind, True, reason, message)
            return
        if not permanent:
            # The status table knows transient failures by reason alone (auth_retrying).
            if reason not in st.TRANSIENT_CREDENTIAL_REASONS:
                reason = RETRYING_REASON
            self._workload.set_condition(kind, False, reason, message)
            return
        self._workload.set_condition(kind, False, reason, message)
        self._open_episode(UnauthorizedEvent(
            workload=self._workload.name, status_code=None, method=None, path=None,
            reason=reason, message=message, www_authenticate=None, error=None,
            error_description=None, resource_metadata=None, at=datetime.now(UTC),
        ))

    async def flush(self, callback_grace: float = CALLBACK_GRACE) -> None:
        """Wait for queued status writes, and for running callbacks (up to the grace)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + callback_grace
        while True:
            await self._workload.flush()
            pending = [t for t in self._tasks if not t.done()]
            if not pending:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._logger.warning("callbacks_still_running", count=len(pending))
                return
            await asyncio.wait(pending, timeout=remaining)

    async def close(self) -> None:
        """Stopping: cancel callbacks still running (an exec hook's child is stopped) and
        wait for them to end, within STOP_GRACE."""
        pending = [t for t in self._tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=STOP_GRACE)

    # --- decisions (synchronous, in memory) ---------------------------------------

    def _note_settled(self) -> None:
        """Remember the view if a good MCP answer could change nothing in it.

        That holds when no episode is open and the view already says Authorized=True and
        Authenticated=True with the reasons a good answer sets: then `set_condition`
        would queue nothing whoever's credential it was (rule 4's proof only matters to
        close an episode), and `on_response` can skip all of it until the view changes.
        """
        view = self._workload.view
        if self.episode_open or view is self._settled:
            return
        authorized = view.condition(st.ConditionType.AUTHORIZED)
        authenticated = view.condition(st.ConditionType.AUTHENTICATED)
        if (authorized is not None and authorized.status
                and authorized.reason == _AUTHORIZED[0]
                and authenticated is not None and authenticated.status
                and authenticated.reason == _ACCEPTED[0]):
            self._settled = view

    def _adopt(self, view: st.WorkloadRecord) -> None:
        """A shared store: take up episodes other replicas opened or ended (no callback)."""
        condition = view.condition(st.ConditionType.AUTHENTICATED)
        shared_open = condition is not None and not condition.status
        if shared_open and not self.episode_open:
            self.episode_open = True
            self._settled = None
            assert condition is not None
            self.unauthorized_since = condition.last_transition_time
            self._announced = None
        elif not shared_open and self.episode_open:
            self.episode_open = False
            self.unauthorized_since = None

    def _proves(self, ex: Exchange) -> bool:
        """Rule 4: a 2xx on an MCP path (after any redirects followed) to the *current*
        credential; without a source, any answer below 400 there."""
        if not self._credentials_configured:
            return True
        return (200 <= ex.status < 300 and ex.credential is not None
                and ex.credential.version == self._current_version())

    def _stale(self, ex: Exchange) -> bool:
        """A 401 to a credential already replaced says nothing about the current one."""
        if not self._credentials_configured or ex.credential is None:
            return False
        current = self._current_version()
        return current is not None and ex.credential.version < current

    def _unauthorized(self, ex: Exchange) -> None:
        if ex.probe and not self._credentials_configured:
            return  # the client authenticates itself; the probe only shows reachability
        if self._credentials_configured and ex.credential is None:
            return  # it carried no credential of ours (a redirect onto an MCP path)
        # With a shared store an episode another replica ended counts as open here until
        # this replica hears of it (pub/sub, else the next heartbeat).
        if self.episode_open or self._stale(ex):
            return
        assert ex.upstream_headers is not None
        _note_sent_secret(ex)
        values = ex.upstream_headers.getall(hdrs.WWW_AUTHENTICATE, [])
        error = bearer_error(values)
        self._open_episode(UnauthorizedEvent(
            workload=self._workload.name, status_code=ex.status, method=ex.method,
            path=ex.path, reason=UNAUTHORIZED_REASON,
            message=unauthorized_message(ex.status, error),
            www_authenticate=mask_known_secrets(", ".join(values)) or None,
            error=_clean(error.error, 64), error_description=_clean(error.error_description),
            resource_metadata=error.resource_metadata, at=datetime.now(UTC),
        ))

    def _forbidden(self, ex: Exchange) -> None:
        assert ex.upstream_headers is not None
        _note_sent_secret(ex)
        error = bearer_error(ex.upstream_headers.getall(hdrs.WWW_AUTHENTICATE, []))
        if error.error != "insufficient_scope":
            return
        write = self._workload.set_condition(st.ConditionType.AUTHORIZED, False,
                                             INSUFFICIENT_SCOPE_REASON, scope_message(error))
        if write is not None:
            self._logger.warning("insufficient_scope", scope=_clean(error.scope),
                                 method=ex.method, path=ex.path)

    def _open_episode(self, event: UnauthorizedEvent) -> None:
        if self.episode_open:
            return
        self.episode_open = True
        self._settled = None
        self.unauthorized_since = event.at
        token = next(self._tokens)
        write = self._workload.set_condition(st.ConditionType.AUTHENTICATED, False,
                                             event.reason, event.message, token,
                                             force=self._workload.shared)
        if not self._workload.shared:
            self._warn_unauthorized(event)
        announced = asyncio.Event()
        self._announced = announced
        self._spawn(self._announce_unauthorized(write, event, announced, token))

    def _warn_unauthorized(self, event: UnauthorizedEvent) -> None:
        self._logger.warning("unauthorized", workload=event.workload, error=event.error,
                             reason=event.reason, status_code=event.status_code,
                             method=event.method, path=event.path)

    def _close_episode(self) -> None:
        if not self.episode_open:
            # Before any episode: record Authenticated=True once (set_condition dedups).
            self._workload.set_condition(st.ConditionType.AUTHENTICATED, True, *_ACCEPTED)
            return
        self.episode_open = False
        since = self.unauthorized_since or datetime.now(UTC)
        self.unauthorized_since = None
        token = next(self._tokens)
        write = self._workload.set_condition(st.ConditionType.AUTHENTICATED, True,
                                             *_ACCEPTED, token)
        event = ReauthorizedEvent(workload=self._workload.name, at=datetime.now(UTC),
                                  unauthorized_since=since)
        if not self._workload.shared:
            self._logger.info("reauthorized", workload=event.workload)
        self._spawn(self._announce_reauthorized(write, event, self._announced, token))

    # --- off the request path -----------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _written(self, write: asyncio.Future[st.WorkloadRecord] | None,
                       token: str) -> bool:
        """Wait until the store holds the change; True when this decision flipped it.

        With a shared store, another replica's flip may have landed first: then the
        episode (and its callback) is that replica's.
        """
        if write is None:
            # Nothing new was queued (the view already said so); wait for what is.
            await self._workload.flush()
            return not self._workload.shared
        record = await asyncio.shield(write)
        return record.episode_token == token or self._workload.detached

    async def _announce_unauthorized(self, write: asyncio.Future[st.WorkloadRecord] | None,
                                     event: UnauthorizedEvent, announced: asyncio.Event,
                                     token: str) -> None:
        try:
            if await self._written(write, token):
                if self._workload.shared:
                    # Logged by the replica that opened the episode, once it is recorded.
                    self._warn_unauthorized(event)
                await self._call("on_unauthorized", self._on_unauthorized, event, announced)
        finally:
            announced.set()

    async def _announce_reauthorized(self, write: asyncio.Future[st.WorkloadRecord] | None,
                                     event: ReauthorizedEvent,
                                     announced: asyncio.Event | None, token: str) -> None:
        mine = await self._written(write, token)
        if announced is not None:
            await announced.wait()
        if mine:
            if self._workload.shared:  # logged by the replica whose proof ended it
                self._logger.info("reauthorized", workload=event.workload)
            await self._call("on_reauthorized", self._on_reauthorized, event, None)

    async def _call(self, name: str, callback: Callable[[Any], Any] | None, event: Any,
                    announced: asyncio.Event | None) -> None:
        """Run one callback; plain ones on the loop (keep them quick), async ones awaited."""
        if callback is None:
            return
        try:
            result = callback(event)
            if announced is not None:
                announced.set()
            if inspect.isawaitable(result):
                await result
        except Exception:
            self._logger.exception("callback_failed", callback=name)
