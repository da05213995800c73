"""The status table: every lifecycle x condition combination, and the events that move it."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from proxy.status import model as st
from proxy.status.model import ConditionType as C
from proxy.status.model import Lifecycle as L
from proxy.status.model import WorkloadStatus as S

T0 = datetime(2026, 11, 22, 2, 10, tzinfo=UTC)

# Each condition is absent, True, or False; CredentialAvailable False comes in both kinds.
_CHOICES: dict[C, list[tuple[bool, str] | None]] = {
    C.AUTHENTICATED: [None, (True, "CredentialAccepted"), (False, "UpstreamUnauthorized")],
    C.CREDENTIAL_AVAILABLE: [None, (True, "TokenLoaded"), (False, "TokenFileMissing"),
                             (False, "TokenRefreshRetrying")],
    C.REACHABLE: [None, (True, "ProbeAnswered"), (False, "ProbeFailed")],
    C.AUTHORIZED: [None, (True, "Authorized"), (False, "InsufficientScope")],
}


def _record(lifecycle: L, picks: dict[C, tuple[bool, str] | None]) -> st.WorkloadRecord:
    record = st.WorkloadRecord(name="w", lifecycle=lifecycle, updated_at=T0)
    for kind, pick in picks.items():
        if pick is not None:
            record = record.with_condition(kind, pick[0], pick[1], f"{pick[1]} message", T0)
    return record


def _expected(lifecycle: L, picks: dict[C, tuple[bool, str] | None]) -> tuple[S, str]:
    """The contract's table, written out independently of proxy.status."""
    def false(kind: C) -> bool:
        pick = picks[kind]
        return pick is not None and not pick[0]

    def reason(kind: C) -> str:
        pick = picks[kind]
        assert pick is not None
        return pick[1]

    lifecycle_rows = {L.STOPPING: (S.STOPPING, "Stopping"), L.STOPPED: (S.STOPPED, "Stopped"),
                      L.FAILED: (S.ERROR, "StartFailed"), L.STARTING: (S.STARTING, "Starting")}
    if lifecycle in lifecycle_rows:
        return lifecycle_rows[lifecycle]
    cred_false = false(C.CREDENTIAL_AVAILABLE)
    cred_permanent = cred_false and reason(C.CREDENTIAL_AVAILABLE) != "TokenRefreshRetrying"
    if false(C.AUTHENTICATED) or cred_permanent:
        decider = C.CREDENTIAL_AVAILABLE if cred_false else C.AUTHENTICATED
        return S.UNAUTHENTICATED, reason(decider)
    if cred_false:
        return S.AUTH_RETRYING, "TokenRefreshRetrying"
    if false(C.REACHABLE):
        return S.UNHEALTHY, "ProbeFailed"
    return S.RUNNING, "Running"


_COMBINATIONS = [
    (lifecycle, dict(zip(_CHOICES, values, strict=True)))
    for lifecycle in L
    for values in itertools.product(*_CHOICES.values())
]


@pytest.mark.parametrize("lifecycle,picks", _COMBINATIONS)
def test_every_combination_follows_the_table(
    lifecycle: L, picks: dict[C, tuple[bool, str] | None]
) -> None:
    """Each lifecycle and condition mix shows the status and reason the contract's table gives."""
    record = _record(lifecycle, picks)
    status, reason = _expected(lifecycle, picks)
    assert (record.status, record.reason) == (status, reason)
    decided_by_condition = record.reason not in ("Stopping", "Stopped", "StartFailed",
                                                 "Starting", "Running")
    if decided_by_condition:
        assert record.message == f"{reason} message"
    assert record.to_dict()["status"] == str(status)


def test_insufficient_scope_shows_only_as_a_condition() -> None:
    """A 403 insufficient_scope leaves the workload running, with the scope in the condition."""
    record = _record(L.SERVING, {C.AUTHENTICATED: None, C.CREDENTIAL_AVAILABLE: None,
                                 C.REACHABLE: None, C.AUTHORIZED: (False, "InsufficientScope")})
    assert record.status is S.RUNNING
    condition = record.condition(C.AUTHORIZED)
    assert condition is not None and not condition.status


def test_serving_never_overwrites_unauthenticated() -> None:
    """A runner saying running while unauthenticated changes nothing visible (rule 3)."""
    record = st.apply(None, st.Started(pid=1, target_url="https://x/mcp"), name="w", at=T0)
    record = st.apply(record, st.SetCondition(C.AUTHENTICATED, False, "UpstreamUnauthorized",
                                              "target answered 401"), name="w", at=T0)
    for _ in range(3):
        record = st.apply(record, st.Serving(), name="w", at=T0)
        assert record.status is S.UNAUTHENTICATED
    record = st.apply(record, st.SetCondition(C.AUTHENTICATED, True, "CredentialAccepted", "ok"),
                      name="w", at=T0)
    assert record.status is S.RUNNING


def test_started_resets_and_stopped_ends_everything() -> None:
    """A new run starts clean, and stopping clears every condition (rule 4's last sentence)."""
    record = _record(L.SERVING, {C.AUTHENTICATED: (False, "UpstreamUnauthorized"),
                                 C.CREDENTIAL_AVAILABLE: None, C.REACHABLE: None,
                                 C.AUTHORIZED: None})
    stopped = st.apply(st.apply(record, st.Stopping(), name="w"), st.Stopped(), name="w")
    assert (stopped.status, stopped.conditions) == (S.STOPPED, ())
    assert st.apply(stopped, st.Serving(), name="w").status is S.STOPPED
    fresh = st.apply(record, st.Started(pid=7, target_url="https://x/mcp"), name="w")
    assert (fresh.status, fresh.conditions, fresh.pid) == (S.STARTING, (), 7)


def test_failed_start_keeps_its_message() -> None:
    """A start failure shows as error with the failure's message, also after a round trip."""
    record = st.apply(None, st.Failed(message="start failed: port in use"), name="w")
    assert (record.status, record.message) == (S.ERROR, "start failed: port in use")
    again = st.WorkloadRecord.from_dict(record.to_dict())
    assert (again.status, again.message) == (S.ERROR, "start failed: port in use")
    assert st.apply(record, st.Stopping(), name="w").status is S.ERROR


def test_transition_time_moves_only_on_a_flip() -> None:
    """A condition's last_transition_time stays put while only its message changes."""
    later = T0 + timedelta(minutes=5)
    record = st.WorkloadRecord(name="w", lifecycle=L.SERVING, updated_at=T0)
    record = record.with_condition(C.REACHABLE, False, "ProbeFailed", "one", T0)
    record = record.with_condition(C.REACHABLE, False, "ProbeFailed", "two", later)
    condition = record.condition(C.REACHABLE)
    assert condition is not None
    assert (condition.message, condition.last_transition_time) == ("two", T0)
    record = record.with_condition(C.REACHABLE, True, "ProbeAnswered", "ok", later)
    condition = record.condition(C.REACHABLE)
    assert condition is not None and condition.last_transition_time == later


def test_record_round_trips_through_json_shape() -> None:
    """What the file holds reads back as the same record, with the contract's fields."""
    record = _record(L.SERVING, {C.AUTHENTICATED: (False, "UpstreamUnauthorized"),
                                 C.CREDENTIAL_AVAILABLE: (True, "TokenLoaded"),
                                 C.REACHABLE: (True, "ProbeAnswered"),
                                 C.AUTHORIZED: None})
    record = st.apply(record, st.Serving(proxy_url="http://127.0.0.1:1/mcp"), name="w", at=T0)
    data = record.to_dict()
    assert {"name", "status", "reason", "message", "updated_at", "pid", "proxy_url",
            "target_url", "conditions"} <= set(data)
    assert data["conditions"][0] == {
        "type": "Authenticated", "status": "False", "reason": "UpstreamUnauthorized",
        "message": "UpstreamUnauthorized message",
        "last_transition_time": "2026-11-22T02:10:00Z"}
    assert st.WorkloadRecord.from_dict(data) == record


def test_status_only_file_maps_back_to_a_lifecycle() -> None:
    """A file written by a tool that knows only `status` still reads as that status."""
    base = {"name": "w", "updated_at": "2026-11-22T02:10:00Z", "conditions": []}
    for status in S:
        if status in (S.UNAUTHENTICATED, S.AUTH_RETRYING, S.UNHEALTHY):
            continue  # these need their conditions
        record = st.WorkloadRecord.from_dict({**base, "status": str(status),
                                              "message": "m"})
        assert record.status is status


@pytest.mark.parametrize("data", [
    [], {"name": "w"}, {"name": "w", "status": "bogus", "updated_at": "x"},
    {"name": "w", "status": "running", "updated_at": "2026-11-22T02:10:00Z", "pid": "1"},
    {"name": "w", "status": "running", "updated_at": "2026-11-22T02:10:00Z",
     "conditions": [{"type": "Nope", "status": "True"}]},
    {"name": "w", "status": "running", "updated_at": "2026-11-22T02:10:00Z", "proxy_url": 5},
    {"name": "w", "status": "running", "updated_at": "2026-11-22T02:10:00Z", "conditions": 5},
])
def test_foreign_shapes_are_refused(data: object) -> None:
    """Something that is not a status record is refused with an error a store can catch."""
    with pytest.raises((ValueError, KeyError, TypeError)):
        st.WorkloadRecord.from_dict(data)  # type: ignore[arg-type]  # foreign on purpose
