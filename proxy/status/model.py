"""Workload status: the lifecycle, four conditions, and the status derived from them.

Everything that decides a workload's status lives here, as data and pure functions;
no I/O. The status is never set directly: writers apply *events* to a record, events
change the lifecycle or a condition, and `derive` computes the status from the
contract's table. So "a runner saying running never overwrites unauthenticated" is a
property of the table (`RunnerRunning` only touches the lifecycle), not an `if`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class WorkloadStatus(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    UNHEALTHY = "unhealthy"
    AUTH_RETRYING = "auth_retrying"
    UNAUTHENTICATED = "unauthenticated"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"


class Lifecycle(StrEnum):
    STARTING = "starting"
    SERVING = "serving"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class ConditionType(StrEnum):
    AUTHENTICATED = "Authenticated"
    CREDENTIAL_AVAILABLE = "CredentialAvailable"
    REACHABLE = "Reachable"
    AUTHORIZED = "Authorized"


# Reasons of CredentialAvailable=False that only a change of the source can heal.
TRANSIENT_CREDENTIAL_REASONS = frozenset({"TokenRefreshRetrying"})


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def format_time(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Condition:
    type: ConditionType
    status: bool
    reason: str
    message: str
    last_transition_time: datetime

    def to_dict(self) -> dict[str, str]:
        return {
            "type": str(self.type),
            "status": "True" if self.status else "False",
            "reason": self.reason,
            "message": self.message,
            "last_transition_time": format_time(self.last_transition_time),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Condition:
        status = data["status"]
        if status not in ("True", "False"):
            raise ValueError(f"condition status {status!r}")
        return cls(
            type=ConditionType(data["type"]),
            status=status == "True",
            reason=str(data["reason"]),
            message=str(data["message"]),
            last_transition_time=parse_time(str(data["last_transition_time"])),
        )


# --- Derivation: the contract's table, first match wins ----------------------------

_LIFECYCLE_STATUS = {
    Lifecycle.STOPPING: WorkloadStatus.STOPPING,
    Lifecycle.STOPPED: WorkloadStatus.STOPPED,
    Lifecycle.FAILED: WorkloadStatus.ERROR,
    Lifecycle.STARTING: WorkloadStatus.STARTING,
}


def _is_false(conditions: Mapping[ConditionType, Condition], kind: ConditionType) -> bool:
    c = conditions.get(kind)
    return c is not None and not c.status


def derive(
    lifecycle: Lifecycle, conditions: Mapping[ConditionType, Condition]
) -> tuple[WorkloadStatus, Condition | None]:
    """The status and the condition that decided it (None when the lifecycle did)."""
    if lifecycle in _LIFECYCLE_STATUS:
        return _LIFECYCLE_STATUS[lifecycle], None
    cred = conditions.get(ConditionType.CREDENTIAL_AVAILABLE)
    cred_false = cred is not None and not cred.status
    cred_permanent = cred_false and cred is not None and (
        cred.reason not in TRANSIENT_CREDENTIAL_REASONS
    )
    if cred_permanent:
        return WorkloadStatus.UNAUTHENTICATED, cred
    if _is_false(conditions, ConditionType.AUTHENTICATED):
        # Where both are False, CredentialAvailable's reason decides (contract).
        return WorkloadStatus.UNAUTHENTICATED, cred if cred_false else conditions[
            ConditionType.AUTHENTICATED]
    if cred_false:
        return WorkloadStatus.AUTH_RETRYING, cred
    if _is_false(conditions, ConditionType.REACHABLE):
        return WorkloadStatus.UNHEALTHY, conditions[ConditionType.REACHABLE]
    return WorkloadStatus.RUNNING, None


_LIFECYCLE_MESSAGES = {
    WorkloadStatus.STARTING: ("Starting", "The proxy is starting."),
    WorkloadStatus.RUNNING: ("Running", "The proxy is forwarding requests."),
    WorkloadStatus.STOPPING: ("Stopping", "The proxy is draining in-flight requests."),
    WorkloadStatus.STOPPED: ("Stopped", "The proxy has stopped."),
    WorkloadStatus.ERROR: ("StartFailed", "The proxy failed to start."),
}


# --- Replicas: one workload served by several processes sharing a store ----------------

# The conditions that belong to the workload; lifecycle and Reachable are each replica's.
WORKLOAD_CONDITIONS = frozenset({ConditionType.AUTHENTICATED,
                                 ConditionType.CREDENTIAL_AVAILABLE,
                                 ConditionType.AUTHORIZED})


@dataclass(frozen=True, slots=True)
class Replica:
    """One live replica of a workload in a shared store (contract: Replicas)."""

    id: str
    host: str
    pid: int
    proxy_url: str | None
    lifecycle: Lifecycle
    updated_at: datetime
    # The replica's own Reachable condition (None before its first probe verdict).
    reachable_condition: Condition | None = None

    @property
    def reachable(self) -> bool:
        c = self.reachable_condition
        return c is None or c.status

    def to_dict(self) -> dict[str, Any]:
        """Exactly the contract's keys."""
        return {"id": self.id, "host": self.host, "pid": self.pid,
                "proxy_url": self.proxy_url, "lifecycle": str(self.lifecycle),
                "reachable": self.reachable, "updated_at": format_time(self.updated_at)}


def shared_lifecycle(replicas: tuple[Replica, ...]) -> Lifecycle:
    """The workload's lifecycle from its live replicas: serving when any one serves."""
    kinds = {r.lifecycle for r in replicas}
    for lifecycle in (Lifecycle.SERVING, Lifecycle.STARTING, Lifecycle.STOPPING):
        if lifecycle in kinds:
            return lifecycle
    if kinds == {Lifecycle.FAILED}:
        return Lifecycle.FAILED
    return Lifecycle.STOPPED  # no live replica


def shared_reachable(replicas: tuple[Replica, ...]) -> Condition | None:
    """Reachable for the workload: False only when every serving replica's target is not."""
    serving = [r for r in replicas if r.lifecycle is Lifecycle.SERVING]
    known = [r.reachable_condition for r in serving if r.reachable_condition is not None]
    if serving and len(known) == len(serving) and not any(c.status for c in known):
        return known[0]
    good = [c for c in known if c.status]
    return good[0] if good else None


# --- The record --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkloadRecord:
    """One workload's status file, as an immutable value. `status` is derived."""

    name: str
    lifecycle: Lifecycle
    conditions: tuple[Condition, ...] = ()
    pid: int | None = None
    proxy_url: str | None = None
    target_url: str | None = None
    updated_at: datetime = field(default_factory=now)
    lifecycle_message: str | None = None
    lifecycle_reason: str | None = None
    # The token of the SetCondition that last flipped Authenticated: a writer learns
    # from the store's answer whether *its* write opened (or ended) the episode.
    episode_token: str | None = None
    # With a shared store: every live replica (None with a file store). Then
    # `lifecycle` and the Reachable in `conditions` are this replica's own, and the
    # status is derived from the replicas (contract: Replicas).
    replicas: tuple[Replica, ...] | None = None

    @property
    def condition_map(self) -> dict[ConditionType, Condition]:
        return {c.type: c for c in self.conditions}

    def shown(self) -> tuple[Lifecycle, tuple[Condition, ...]]:
        """The lifecycle and conditions the status derives from (shared or not)."""
        if self.replicas is None:
            return self.lifecycle, self.conditions
        reachable = shared_reachable(self.replicas)
        conditions = [c for c in self.conditions if c.type in WORKLOAD_CONDITIONS]
        if reachable is not None:
            conditions.append(reachable)
        conditions.sort(key=lambda c: list(ConditionType).index(c.type))
        return shared_lifecycle(self.replicas), tuple(conditions)

    def _derived(self) -> tuple[WorkloadStatus, Condition | None]:
        if self.replicas is None:
            return derive(self.lifecycle, self.condition_map)
        lifecycle, conditions = self.shown()
        return derive(lifecycle, {c.type: c for c in conditions})

    def condition(self, kind: ConditionType) -> Condition | None:
        # A scan of at most four: the request path asks this on every good answer.
        for c in self.conditions:
            if c.type is kind:
                return c
        return None

    @property
    def status(self) -> WorkloadStatus:
        return self._derived()[0]

    @property
    def reason(self) -> str:
        status, decider = self._derived()
        if decider:
            return decider.reason
        if status is WorkloadStatus.ERROR and self.lifecycle_reason:
            return self.lifecycle_reason
        return _LIFECYCLE_MESSAGES[status][0]

    @property
    def message(self) -> str:
        status, decider = self._derived()
        if decider:
            return decider.message
        if status is WorkloadStatus.ERROR and self.lifecycle_message:
            return self.lifecycle_message
        return _LIFECYCLE_MESSAGES[status][1]

    def with_condition(
        self, kind: ConditionType, status: bool, reason: str, message: str, at: datetime
    ) -> WorkloadRecord:
        """Set a condition; its transition time moves only when its status flips."""
        old = self.condition_map.get(kind)
        since = old.last_transition_time if old is not None and old.status == status else at
        new = Condition(kind, status, reason, message, since)
        others = tuple(c for c in self.conditions if c.type is not kind)
        ordered = sorted((*others, new), key=lambda c: list(ConditionType).index(c.type))
        return dataclasses.replace(self, conditions=tuple(ordered), updated_at=at)

    def to_dict(self) -> dict[str, Any]:
        lifecycle, conditions = self.shown()
        data: dict[str, Any] = {
            "name": self.name,
            "status": str(self.status),
            "reason": self.reason,
            "message": self.message,
            "updated_at": format_time(self.updated_at),
            "pid": self.pid,
            "proxy_url": self.proxy_url,
            "target_url": self.target_url,
            "lifecycle": str(lifecycle),
            "conditions": [c.to_dict() for c in conditions],
        }
        if self.replicas is not None:
            data["replicas"] = [r.to_dict() for r in self.replicas]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkloadRecord:
        """Parse a status file's object; raises ValueError/KeyError/TypeError when foreign."""
        if not isinstance(data, Mapping):
            raise TypeError("status file must hold a JSON object")
        lifecycle_text = data.get("lifecycle")
        if lifecycle_text is None:
            # Written by someone who only knows the status: map it back.
            status = WorkloadStatus(data["status"])
            lifecycle = {
                WorkloadStatus.STARTING: Lifecycle.STARTING,
                WorkloadStatus.STOPPING: Lifecycle.STOPPING,
                WorkloadStatus.STOPPED: Lifecycle.STOPPED,
                WorkloadStatus.ERROR: Lifecycle.FAILED,
            }.get(status, Lifecycle.SERVING)
        else:
            lifecycle = Lifecycle(lifecycle_text)
        pid = data.get("pid")
        if pid is not None and not isinstance(pid, int):
            raise TypeError("pid must be an integer")
        for url_field in ("proxy_url", "target_url"):
            if not isinstance(data.get(url_field), str | None):
                raise TypeError(f"{url_field} must be a string")
        conditions = tuple(Condition.from_dict(c) for c in data.get("conditions", ()))
        return cls(
            name=str(data["name"]),
            lifecycle=lifecycle,
            conditions=conditions,
            pid=pid,
            proxy_url=data.get("proxy_url"),
            target_url=data.get("target_url"),
            updated_at=parse_time(str(data["updated_at"])),
            lifecycle_message=(
                str(data["message"]) if lifecycle is Lifecycle.FAILED else None
            ),
            lifecycle_reason=(
                str(data["reason"]) if lifecycle is Lifecycle.FAILED and "reason" in data
                else None
            ),
        )


# --- Events: the only way a record changes ------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    """A run process claims the workload: lifecycle `starting`, conditions reset."""

    pid: int
    target_url: str
    proxy_url: str | None = None


@dataclass(frozen=True, slots=True)
class Serving:
    """The process accepts connections (rule 1) — or a runner says "running" (rule 3)."""

    proxy_url: str | None = None


@dataclass(frozen=True, slots=True)
class Stopping:
    pass


@dataclass(frozen=True, slots=True)
class Stopped:
    pass


@dataclass(frozen=True, slots=True)
class Failed:
    message: str
    reason: str = "StartFailed"


@dataclass(frozen=True, slots=True)
class SetCondition:
    """Any condition change: episodes, credential source, probes, 403 scope."""

    kind: ConditionType
    status: bool
    reason: str
    message: str
    # Who decided this change (an episode's opener or closer); see `episode_token`.
    token: str | None = None


Event = Started | Serving | Stopping | Stopped | Failed | SetCondition


def apply(record: WorkloadRecord | None, event: Event, *, name: str,
          at: datetime | None = None) -> WorkloadRecord:
    """The one transition function: old record (or none) + event -> new record."""
    at = at or now()
    base = record or WorkloadRecord(name=name, lifecycle=Lifecycle.STARTING, updated_at=at)
    match event:
        case Started(pid=pid, target_url=target_url, proxy_url=proxy_url):
            return WorkloadRecord(name=name, lifecycle=Lifecycle.STARTING, pid=pid,
                                  target_url=target_url, proxy_url=proxy_url, updated_at=at)
        case Serving(proxy_url=proxy_url):
            lifecycle = base.lifecycle
            if lifecycle is Lifecycle.STARTING:
                lifecycle = Lifecycle.SERVING
            return dataclasses.replace(base, lifecycle=lifecycle, updated_at=at,
                                       proxy_url=proxy_url or base.proxy_url)
        case Stopping():
            if base.lifecycle in (Lifecycle.STOPPED, Lifecycle.FAILED):
                return base
            return dataclasses.replace(base, lifecycle=Lifecycle.STOPPING, updated_at=at)
        case Stopped():
            # Stopping ends everything: no condition outlives its process.
            return dataclasses.replace(base, lifecycle=Lifecycle.STOPPED, conditions=(),
                                       updated_at=at)
        case Failed(message=message, reason=reason):
            return dataclasses.replace(base, lifecycle=Lifecycle.FAILED, updated_at=at,
                                       lifecycle_message=message, lifecycle_reason=reason)
        case SetCondition(kind=kind, status=status, reason=reason, message=message,
                          token=token):
            record = base.with_condition(kind, status, reason, message, at)
            if kind is ConditionType.AUTHENTICATED:
                old = base.condition(kind)
                if (old.status if old is not None else True) != status:
                    record = dataclasses.replace(record, episode_token=token)
            return record
    raise TypeError(f"not a status event: {event!r}")  # pragma: no cover
