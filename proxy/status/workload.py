"""`Workload`: one workload's record in memory, kept in step with its status store.

The request path reads and changes status through this object without doing I/O:
`set_condition` is synchronous, compares with the in-memory view and, only when a
condition really changes, queues a write. One writer task applies queued events to
the store strictly in order, so the store sees them in the order they were decided.

It must never stop forwarding because the store failed. With the file store a failing
write (`StateError`) is logged once per kind of failure, the in-memory record moves on
anyway, and later writes are still attempted. A *shared* store (`store.shared`, Redis)
is other replicas' view too, so nothing may be dropped: a failing write stays queued
and is retried with backoff until the store takes it; meanwhile callers of `apply` and
`claim` get the record as it will be, and the future `set_condition` returns (which an
episode's callback waits for) resolves only once the store recorded the change. A
shared store also changes under us: `start_sync` heartbeats and re-reads it, and
`listeners` hear of every new view. Only `NameInUse` and `UnsafePath` (a state
directory others could write) from `claim` reach the caller.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from ..errors import NameInUse, StateError, UnsafePath
from ..log import get_logger
from ..status import model as st
from .store import SharedStatusStore, StatusStore

_Operation = Callable[[Any], Awaitable[st.WorkloadRecord]]
RETRY_FIRST = 0.05  # seconds before retrying a shared store that failed a write
RETRY_CAP = 2.0  # longest wait between retries: the store coming back is noticed soon
# At shutdown, how long a cancelled sync/writer task and the store client's close may
# take: a stop must end even when the store or its client library hangs.
CLOSE_GRACE = 2.0


@dataclass(slots=True)
class _Write:
    operation: _Operation
    event: st.Event
    landed: asyncio.Future[st.WorkloadRecord]  # the store recorded it
    settled: asyncio.Future[st.WorkloadRecord]  # recorded, or kept for later (shared)


class Workload:
    """The in-memory view of one workload's status record, plus its store."""

    def __init__(self, store: StatusStore, *, logger: Any = None) -> None:
        self.store = store
        self.name = store.name
        self.shared = bool(getattr(store, "shared", False))
        self._shared_store = cast(SharedStatusStore, store) if self.shared else None
        self._logger = logger if logger is not None else get_logger().bind(workload=store.name)
        # The record as the store last returned it (or as it moved on after a failed write).
        self.record = st.WorkloadRecord(name=store.name, lifecycle=st.Lifecycle.STARTING)
        # `record` plus every queued, not yet written event: what decisions compare with;
        # the record as it will be once queued writes land. Read-only outside this class.
        # Records are immutable, so `workload.view is seen` tells a reader (the auth
        # monitor, per request) that nothing changed since it looked.
        self.view = self.record
        self._queue: deque[_Write] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._sync: asyncio.Task[None] | None = None
        self._failing: set[str] = set()  # kinds of write failure logged, until a success
        self._writes = 0  # writes that landed: a sync read older than one is dropped
        self.detached = False  # stopped writing to the store for good (`detach`)
        self._down = False  # a shared store failed the last write: callers do not wait
        # Told of every new view that came from the store (a shared store's other writers).
        self.listeners: list[Callable[[st.WorkloadRecord], None]] = []

    def condition(self, kind: st.ConditionType) -> st.Condition | None:
        return self.view.condition(kind)

    async def claim(self, started: st.Started) -> st.WorkloadRecord:
        """Take the workload name for this process; raises `NameInUse`."""
        return await self._enqueue(self.store.claim, started).settled

    async def apply(self, event: st.Event) -> st.WorkloadRecord:
        """Write `event` now, after any queued writes; returns the record in effect."""
        return await self._enqueue(self.store.update, event).settled

    def set_condition(
        self, kind: st.ConditionType, status: bool, reason: str, message: str,
        token: str | None = None, *, force: bool = False,
    ) -> asyncio.Future[st.WorkloadRecord] | None:
        """Queue a condition change; None (and nothing queued) when nothing would change.

        Synchronous and I/O-free, so the request path may call it. Only status and
        reason count as a change: a new message alone is not worth a write. The future
        resolves once the store recorded the change. `force` queues it even when the
        view agrees: a shared store may hold something else by now.
        """
        current = self.view.condition(kind)
        if (not force and current is not None and current.status == status
                and current.reason == reason):
            return None
        event = st.SetCondition(kind, status, reason, message, token)
        return self._enqueue(self.store.update, event).landed

    async def flush(self) -> None:
        """Wait until every queued write has been attempted (shared: has landed)."""
        while self._writer is not None and not self._writer.done():
            # Shielded: a cancelled flush must not cancel writes others wait for.
            await asyncio.shield(self._writer)

    def detach(self, failure: st.Failed) -> None:
        """Stop writing to the store for good: this process is in `error` (StoreKeyMismatch).

        Queued writes are dropped (their waiters get the failed record), the sync stops,
        and the record and view say `error` locally.
        """
        self.detached = True
        if self._sync is not None:
            self._sync.cancel()
        if self._writer is not None:
            self._writer.cancel()
        # Its own record only: the shared one is not this replica's to speak for now.
        own = dataclasses.replace(self.record, replicas=None)
        self.record = st.apply(own, failure, name=self.name)
        self.view = self.record
        while self._queue:
            write = self._queue.popleft()
            for future in (write.landed, write.settled):
                if not future.done():
                    future.set_result(self.record)

    @property
    def store_down(self) -> bool:
        """A shared store failed the last write and has not taken one since."""
        return self._down

    async def close(self) -> None:
        """Stop the sync and any write still retrying (a shared store that stayed down)."""
        tasks = [t for t in (self._sync, self._writer) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_GRACE)
            for task in tasks:
                if not task.done():
                    self._logger.warning("store_task_stuck", task=task.get_name(),
                                         action="left behind at shutdown")
        if self._shared_store is not None:
            try:
                await asyncio.wait_for(self._shared_store.close(), CLOSE_GRACE)
            except (TimeoutError, StateError, OSError) as exc:
                self._logger.warning("store_close_failed", error=type(exc).__name__)

    # --- a shared store: heartbeat and re-read -------------------------------------

    def start_sync(self, interval: float) -> None:
        """Heartbeat this replica and pick up other replicas' changes every `interval` s,
        and at once when the store says another replica changed the workload."""
        if self.shared and self._sync is None and not self.detached:
            self._sync = asyncio.get_running_loop().create_task(
                self._sync_loop(interval), name=f"status-sync:{self.name}")

    async def _sync_loop(self, interval: float) -> None:
        assert self._shared_store is not None
        heartbeat = self._shared_store.heartbeat
        while True:
            await self._shared_store.wait_change(interval)
            if self._queue:
                continue  # the writer is busy (or retrying); its answers resync us
            seen = self._writes
            try:
                record = await heartbeat()
            except StateError:
                continue  # the store logged the loss; the next beat tries again
            if self._writes != seen or self._queue or self.detached:
                continue  # a write landed meanwhile: its answer is newer than this read
            self.record = record
            self._resync()

    # --- the writer ---------------------------------------------------------------

    def _enqueue(self, operation: _Operation, event: st.Event) -> _Write:
        loop = asyncio.get_running_loop()
        write = _Write(operation, event, loop.create_future(), loop.create_future())
        if self.detached:
            for future in (write.landed, write.settled):
                future.set_result(self.record)
            return write
        self._queue.append(write)
        self.view = st.apply(self.view, event, name=self.name)
        if self._down:
            write.settled.set_result(self.view)  # kept for the store; the caller moves on
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._drain(), name=f"status-writer:{self.name}")
        return write

    async def _drain(self) -> None:
        delay = RETRY_FIRST
        while self._queue:
            write = self._queue[0]
            try:
                record = await write.operation(write.event)
            except (NameInUse, UnsafePath) as exc:
                if isinstance(exc, NameInUse) or isinstance(write.event, st.Started):
                    self._queue.popleft()
                    self._resync()
                    for future in (write.landed, write.settled):
                        if not future.done():
                            future.set_exception(exc)
                    write.landed.exception()  # the caller awaits `settled`; this one is seen
                    continue
                # Made unsafe while running: like a failing disk, forwarding goes on.
                self._failed(exc)
                record = st.apply(self.record, write.event, name=self.name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # StateError, or a store bug: neither stops the writer
                if self.shared:
                    # Kept, in order, until the store takes it; the callers move on.
                    self._down = True
                    view = self.record
                    for queued in self._queue:
                        view = st.apply(view, queued.event, name=self.name)
                        if not queued.settled.done():
                            queued.settled.set_result(view)
                    if not isinstance(exc, StateError):
                        self._failed(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_CAP)
                    continue
                self._failed(exc)
                record = st.apply(self.record, write.event, name=self.name)
            else:
                self._down = False
                self._succeeded()
                self._writes += 1
                delay = RETRY_FIRST
            self._queue.popleft()
            self.record = record
            self._resync()
            for future in (write.landed, write.settled):
                if not future.done():
                    future.set_result(record)

    def _resync(self) -> None:
        """Rebuild the view from the store's answer: another process may have written."""
        view = self.record
        for write in self._queue:
            view = st.apply(view, write.event, name=self.name)
        self.view = view
        for listener in self.listeners:
            listener(view)

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
