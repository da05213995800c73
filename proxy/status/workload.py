"""`Workload`: one workload's record in memory, kept in step with its status store.

The request path reads and changes status through this object without doing I/O:
`set_condition` is synchronous, compares with the in-memory view and, only when a
condition really changes, queues a write. One writer task applies queued events to
the store strictly in order, so the file sees them in the order they were decided.

It must never stop forwarding because the disk failed: a failing write (`StateError`)
is logged once per kind of failure, the in-memory record moves on anyway, and later
writes are still attempted. Only `NameInUse` and `UnsafePath` (a state directory
others could write) from `claim` reach the caller.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import NameInUse, StateError, UnsafePath
from ..log import get_logger
from ..status import model as st
from .store import StatusStore

_Operation = Callable[[Any], Awaitable[st.WorkloadRecord]]


class Workload:
    """The in-memory view of one workload's status record, plus its store."""

    def __init__(self, store: StatusStore, *, logger: Any = None) -> None:
        self.store = store
        self.name = store.name
        self._logger = logger if logger is not None else get_logger().bind(workload=store.name)
        # The record as the store last returned it (or as it moved on after a failed write).
        self.record = st.WorkloadRecord(name=store.name, lifecycle=st.Lifecycle.STARTING)
        # `record` plus every queued, not yet written event: what decisions compare with;
        # the record as it will be once queued writes land. Read-only outside this class.
        # Records are immutable, so `workload.view is seen` tells a reader (the auth
        # monitor, per request) that nothing changed since it looked.
        self.view = self.record
        self._queue: deque[tuple[_Operation, st.Event, asyncio.Future[st.WorkloadRecord]]] = (
            deque()
        )
        self._writer: asyncio.Task[None] | None = None
        self._failing: set[str] = set()  # kinds of write failure logged, until a success

    def condition(self, kind: st.ConditionType) -> st.Condition | None:
        return self.view.condition(kind)

    async def claim(self, started: st.Started) -> st.WorkloadRecord:
        """Take the workload name for this process; raises `NameInUse`."""
        return await self._enqueue(self.store.claim, started)

    async def apply(self, event: st.Event) -> st.WorkloadRecord:
        """Write `event` now, after any queued writes; returns the record in effect."""
        return await self._enqueue(self.store.update, event)

    def set_condition(
        self, kind: st.ConditionType, status: bool, reason: str, message: str
    ) -> asyncio.Future[st.WorkloadRecord] | None:
        """Queue a condition change; None (and nothing queued) when nothing would change.

        Synchronous and I/O-free, so the request path may call it. Only status and
        reason count as a change: a new message alone is not worth a write.
        """
        current = self.view.condition(kind)
        if current is not None and current.status == status and current.reason == reason:
            return None
        return self._enqueue(self.store.update, st.SetCondition(kind, status, reason, message))

    async def flush(self) -> None:
        """Wait until every queued write has been attempted."""
        while self._writer is not None and not self._writer.done():
            # Shielded: a cancelled flush must not cancel writes others wait for.
            await asyncio.shield(self._writer)

    # --- the writer ---------------------------------------------------------------

    def _enqueue(
        self, operation: _Operation, event: st.Event
    ) -> asyncio.Future[st.WorkloadRecord]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[st.WorkloadRecord] = loop.create_future()
        self._queue.append((operation, event, future))
        self.view = st.apply(self.view, event, name=self.name)
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._drain(), name=f"status-writer:{self.name}")
        return future

    async def _drain(self) -> None:
        while self._queue:
            operation, event, future = self._queue[0]
            try:
                record = await operation(event)
            except (NameInUse, UnsafePath) as exc:
                if isinstance(exc, NameInUse) or isinstance(event, st.Started):
                    self._queue.popleft()
                    self._resync()
                    if not future.done():
                        future.set_exception(exc)
                    continue
                # Made unsafe while running: like a failing disk, forwarding goes on.
                self._failed(exc)
                record = st.apply(self.record, event, name=self.name)
            except StateError as exc:
                self._failed(exc)
                record = st.apply(self.record, event, name=self.name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a store bug must not stop the writer either
                self._failed(exc)
                record = st.apply(self.record, event, name=self.name)
            else:
                self._succeeded()
            self._queue.popleft()
            self.record = record
            self._resync()
            if not future.done():
                future.set_result(record)

    def _resync(self) -> None:
        """Rebuild the view from the store's answer: another process may have written."""
        view = self.record
        for _, event, _ in self._queue:
            view = st.apply(view, event, name=self.name)
        self.view = view

    def _failed(self, exc: Exception) -> None:
        cause = exc.__cause__
        kind = f"{type(cause or exc).__name__}:{getattr(cause, 'errno', None)}"
        if kind in self._failing:
            return
        self._failing.add(kind)
        self._logger.error("status_write_failed", error=str(exc),
                           action="status kept in memory; forwarding continues")

    def _succeeded(self) -> None:
        if self._failing:
            self._failing.clear()
            self._logger.info("status_write_recovered")
