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

    @property
    def condition_map(self) -> dict[ConditionType, Condition]:
        return {c.type: c for c in self.conditions}

    def condition(self, kind: ConditionType) -> Condition | None:
        # A scan of at most four: the request path asks this on every good answer.
        for c in self.conditions:
            if c.type is kind:
                return c
        return None

    @property
    def status(self) -> WorkloadStatus:
        return derive(self.lifecycle, self.condition_map)[0]

    @property
    def reason(self) -> str:
        status, decider = derive(self.lifecycle, self.condition_map)
        return decider.reason if decider else _LIFECYCLE_MESSAGES[status][0]

    @property
    def message(self) -> str:
        status, decider = derive(self.lifecycle, self.condition_map)
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
        return {
            "name": self.name,
            "status": str(self.status),
            "reason": self.reason,
            "message": self.message,
            "updated_at": format_time(self.updated_at),
            "pid": self.pid,
            "proxy_url": self.proxy_url,
            "target_url": self.target_url,
            "lifecycle": str(self.lifecycle),
            "conditions": [c.to_dict() for c in self.conditions],
        }

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


@dataclass(frozen=True, slots=True)
class SetCondition:
    """Any condition change: episodes, credential source, probes, 403 scope."""

    kind: ConditionType
    status: bool
    reason: str
    message: str


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
        case Failed(message=message):
            return dataclasses.replace(base, lifecycle=Lifecycle.FAILED, updated_at=at,
                                       lifecycle_message=message)
        case SetCondition(kind=kind, status=status, reason=reason, message=message):
            return base.with_condition(kind, status, reason, message, at)
    raise TypeError(f"not a status event: {event!r}")  # pragma: no cover
