"""Health probes of the target: the `Reachable` condition (contract rules 4 and 7).

A probe is POSTed to the target URL, one at a time, every `health_interval` seconds,
and at once when the credential changes. While all is well it is a JSON-RPC `ping`.
The stateful servers MCP SDKs build by default answer a session-less `ping` with 400,
which proves nothing, so while an auth episode is open (and once after each change of
the credential) the probe is an MCP `initialize` instead, whose 2xx (JSON or an event
stream) proves the credential; the session it opened is then deleted (`DELETE` with its
`Mcp-Session-Id`), unless the target once answered that with 405.

`probe.classify_probe` turns what came back into a `ProbeResult` (pure, table-tested);
`HealthProber` runs the loop, counts consecutive failures and sets `Reachable` on a
change only. Every answer is also handed to the forward observer as a probe
`Exchange`, so a 401 opens an auth episode and a good answer proves the credential
exactly as a client's request would.

This module must never log or keep a credential, never warn once per failed probe
(only on a change of state), and never follow a redirect (the credential stays on the
target's origin).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDictProxy

from ..config import ProxyConfig
from ..credentials.base import Credential, CredentialSource
from ..errors import CredentialUnavailable
from ..forwarding.observe import Exchange, ForwardObserver
from ..log import get_logger
from ..status.model import ConditionType
from .probe import (
    PLAIN_TOKEN,
    ProbeOutcome,
    ProbeRecorder,
    ProbeResult,
    classify_probe,
    describe_error,
    unreachable_message,
)

__all__ = ["PROBE_BODY", "ConditionSink", "HealthProber", "ProbeOutcome", "ProbeRecorder",
           "ProbeResult", "classify_probe"]

PROBE_ID = "mcp-authproxy-health"
PROBE_BODY = b'{"jsonrpc":"2.0","id":"mcp-authproxy-health","method":"ping"}'
PROBE_HEADERS: Mapping[str, str] = {
    hdrs.ACCEPT: "application/json, text/event-stream",
    hdrs.CONTENT_TYPE: "application/json",
}
# Enough to let a short JSON answer end cleanly (the connection can be kept alive);
# a probe never waits for, or keeps, more than this.
BODY_LIMIT = 4096
# An `initialize` answer (server info, capabilities, instructions) is read up to this
# much, JSON or the first event of a stream, to learn the negotiated protocol version.
INITIALIZE_LIMIT = 64 * 1024
PROTOCOL_VERSION = "2025-06-18"
INITIALIZE_BODY = json.dumps({
    "jsonrpc": "2.0", "id": PROBE_ID, "method": "initialize",
    "params": {"protocolVersion": PROTOCOL_VERSION, "capabilities": {},
               "clientInfo": {"name": "mcp-authproxy-health", "version": "1"}},
}, separators=(",", ":")).encode()
SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
# How often the wait between probes looks whether the credential changed (sources that
# tell the prober themselves wake it at once).
CREDENTIAL_TICK = 1.0

class ConditionSink(Protocol):
    """Where a condition change goes (the workload); writes only on a change."""

    # Returns whatever the sink likes (the workload: its queued write); probes ignore it.
    def set_condition(
        self, kind: ConditionType, status: bool, reason: str, message: str
    ) -> object: ...


class HealthProber:
    """Probes the target every `health_interval` seconds; never two probes at once."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        session: aiohttp.ClientSession,
        credentials: CredentialSource | None,
        conditions: ConditionSink,
        observer: ForwardObserver,
        metrics: ProbeRecorder | None = None,
        logger: Any = None,
        proof_wanted: Callable[[], bool] | None = None,
    ) -> None:
        """`proof_wanted` says whether an auth episode is open: then probes `initialize`."""
        self._config = config
        self._session = session
        self._credentials = credentials
        self._conditions = conditions
        self._observer = observer
        self._metrics = metrics
        self._log = (logger or get_logger()).bind(workload=config.workload)
        self._timeout = aiohttp.ClientTimeout(total=config.health_timeout)
        self._proof_wanted = proof_wanted or (lambda: False)
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._checked_version: int | None = None  # credential an `initialize` was sent with
        self._delete_refused = False  # the target answered a session DELETE with 405
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self._reachable: bool | None = None
        self.last_result: ProbeResult | None = None

    @property
    def reachable(self) -> bool | None:
        """The `Reachable` condition as this prober last set it (None before any verdict)."""
        return self._reachable

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    async def start(self) -> None:
        """Begin probing: the first probe at once (in a task), then every interval."""
        if self._config.health_interval == 0 or self._task is not None:
            return
        self._task = asyncio.create_task(self._run(), name="mcp-authproxy-health")

    async def stop(self) -> None:
        """Cancel the loop and wait for it; a probe in flight is abandoned."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise

    def credential_changed(self) -> None:
        """The credential source has news: probe now rather than at the next interval."""
        self._wake.set()

    async def _run(self) -> None:
        interval = self._config.health_interval
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.probe_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug in a collaborator must not end probing for the process's life.
                self._log.exception("health_probe_crashed")
            # Probes start on a fixed schedule; a slow probe delays the next, never
            # overlaps it. A changed credential is probed at once, and the schedule
            # starts again from there.
            next_at = max(next_at + interval, loop.time())
            if await self._pause(next_at):
                next_at = loop.time()

    async def _pause(self, until: float) -> bool:
        """Wait until `until`; True when cut short because the credential changed."""
        loop = asyncio.get_running_loop()
        while (remaining := until - loop.time()) > 0:
            if self._wake.is_set() or self._credential_moved():
                self._wake.clear()
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(remaining, CREDENTIAL_TICK))
        self._wake.clear()
        return False

    def _credential_moved(self) -> bool:
        if self._credentials is None:
            return False
        version = self._credentials.current_version
        return version is not None and version != self._checked_version

    async def probe_once(self) -> ProbeResult:
        """Send one probe, record it and update `Reachable`; returns the classification."""
        async with self._lock:
            credential = await self._credential()
            result = await self._send(credential)
            self.last_result = result
            if self._metrics is not None:
                self._metrics.probe(result)
            self._count(result)
            return result

    async def _credential(self) -> Credential | None:
        if self._credentials is None:
            return None
        try:
            # A credential still missing when the probe would have timed out is
            # missing for this probe; the probe itself still checks reachability.
            return await asyncio.wait_for(self._credentials.get(), self._config.health_timeout)
        except (CredentialUnavailable, TimeoutError):
            return None

    def _wants_initialize(self, credential: Credential | None) -> bool:
        """An `initialize` (which can prove) while an episode is open, or once for a
        credential not yet checked; a cheap `ping` otherwise."""
        if credential is None:
            return False  # nothing to prove: the probe only shows reachability
        return self._proof_wanted() or credential.version != self._checked_version

    async def _send(self, credential: Credential | None) -> ProbeResult:
        headers = dict(PROBE_HEADERS)
        if credential is not None:
            headers[hdrs.AUTHORIZATION] = credential.authorization
        initialize = self._wants_initialize(credential)
        started = time.monotonic()
        session_id: str | None = None
        protocol: str | None = None
        try:
            async with self._session.post(
                self._config.target, data=INITIALIZE_BODY if initialize else PROBE_BODY,
                headers=headers, timeout=self._timeout, allow_redirects=False,
            ) as response:
                elapsed = time.monotonic() - started
                result = classify_probe(response.status, response.headers, None,
                                        credentials_configured=credential is not None)
                if initialize and credential is not None and not result.failed:
                    self._checked_version = credential.version
                self._notify(result, response.headers, credential, elapsed)
                if initialize and 200 <= response.status < 300:
                    session_id = response.headers.get(SESSION_HEADER)
                    protocol = await self._initialize_answer(response)
                else:
                    await self._drain(response)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            result = classify_probe(None, None, error, credentials_configured=False)
        if session_id:
            await self._end_session(session_id, protocol, credential)
        return result

    async def _initialize_answer(self, response: aiohttp.ClientResponse) -> str | None:
        """The protocol version the target chose, from a JSON answer or the first event of
        a stream (read within the probe's limits); None when it cannot be read."""
        data = b""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
            if response.headers.get(hdrs.CONTENT_TYPE, "").startswith("text/event-stream"):
                lines: list[bytes] = []
                async for line in response.content:  # ends at the first complete event
                    if len(data) > INITIALIZE_LIMIT:
                        break
                    data += line
                    if line.strip() == b"":
                        if lines:
                            break
                        continue
                    if line.startswith(b"data:"):
                        lines.append(line[5:].strip())
                data = b"\n".join(lines)
            else:
                data = await response.content.read(INITIALIZE_LIMIT)
            answer = json.loads(data)
            version = answer.get("result", {}).get("protocolVersion")
            if isinstance(version, str) and PLAIN_TOKEN.fullmatch(version):
                return version
        return None

    async def _end_session(self, session_id: str, protocol: str | None,
                           credential: Credential | None) -> None:
        """Delete the session the `initialize` probe opened: a probe leaves none behind."""
        if self._delete_refused or any(c in session_id for c in "\r\n\0"):
            return
        headers = {SESSION_HEADER: session_id}
        if protocol is not None:
            headers[VERSION_HEADER] = protocol
        if credential is not None:
            headers[hdrs.AUTHORIZATION] = credential.authorization
        try:
            async with self._session.delete(self._config.target, headers=headers,
                                            timeout=self._timeout,
                                            allow_redirects=False) as response:
                if response.status == 405:
                    # The target lets clients keep their sessions: do not ask again.
                    self._delete_refused = True
                    self._log.info("health_probe_session_delete_refused")
                await self._drain(response)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            _, detail = describe_error(error)
            self._log.debug("health_probe_session_delete_failed", detail=detail)

    @staticmethod
    async def _drain(response: aiohttp.ClientResponse) -> None:
        # Headers decided the probe; a short body read lets a keep-alive connection be
        # reused, while a held-open stream is simply closed on release.
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            if response.content_length is not None and response.content_length <= BODY_LIMIT:
                await response.content.read(BODY_LIMIT)

    def _notify(self, result: ProbeResult, headers: CIMultiDictProxy[str],
                credential: Credential | None, elapsed: float) -> None:
        if not result.notify:
            return
        if self._credentials is not None and credential is None:
            # The source had nothing to send: this answer proves nothing about it.
            return
        content_type = headers.get(hdrs.CONTENT_TYPE, "")
        exchange = Exchange(
            method=hdrs.METH_POST,
            path=self._config.mcp_path,
            on_mcp_path=True,
            status=result.status or 0,
            upstream_headers=headers,
            credential=credential,
            upstream_seconds=elapsed,
            sse=content_type.lower().startswith("text/event-stream"),
            probe=True,
        )
        try:
            self._observer.on_response(exchange)
        except Exception:
            self._log.exception("health_probe_observer_failed")

    def _count(self, result: ProbeResult) -> None:
        if result.failed:
            self._failures += 1
            self._log.debug("health_probe_failed", outcome=str(result.outcome),
                            detail=result.detail, consecutive=self._failures)
            if self._failures >= self._config.health_failures and self._reachable is not False:
                self._reachable = False
                message = unreachable_message(self._failures, result)
                self._conditions.set_condition(ConditionType.REACHABLE, False, "ProbeFailed",
                                               message)
                self._log.warning("target_unreachable", consecutive=self._failures,
                                  detail=result.detail)
            return
        self._failures = 0
        if self._reachable is not True:
            recovered = self._reachable is False
            self._reachable = True
            self._conditions.set_condition(ConditionType.REACHABLE, True, "ProbeSucceeded",
                                           f"The target answered a health probe: {result.detail}.")
            if recovered:
                self._log.info("target_reachable", detail=result.detail)
