"""The shared record's rules: derivation across replicas, store URLs, and the embedding
API against a real Redis."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from proxy import AuthProxy, ProxyConfig, WorkloadStatus
from proxy.config import parse_store, redact_store_url
from proxy.status import model as st

from .conftest import GatedUpstream, RedisServer
from helpers import write_secret

AT = datetime(2026, 12, 1, tzinfo=UTC)
C = st.ConditionType


def replica(n: int, lifecycle: st.Lifecycle = st.Lifecycle.SERVING,
            reachable: bool | None = None) -> st.Replica:
    condition = None if reachable is None else st.Condition(
        C.REACHABLE, reachable, "Probe" if reachable else "ProbeFailed",
        f"probe {n}", AT)
    return st.Replica(f"r{n}", "host", n, f"http://127.0.0.1:{n}/mcp", lifecycle, AT,
                      condition)


def shared(*replicas: st.Replica, conditions: tuple[st.Condition, ...] = ()
           ) -> st.WorkloadRecord:
    return st.WorkloadRecord(name="w", lifecycle=st.Lifecycle.SERVING,
                             conditions=conditions, replicas=replicas)


@pytest.mark.parametrize(("replicas", "status"), [
    ((), WorkloadStatus.STOPPED),
    ((replica(1, st.Lifecycle.STARTING),), WorkloadStatus.STARTING),
    ((replica(1, st.Lifecycle.STARTING), replica(2)), WorkloadStatus.RUNNING),
    ((replica(1, reachable=False), replica(2, reachable=True)), WorkloadStatus.RUNNING),
    ((replica(1, reachable=False), replica(2, reachable=False)), WorkloadStatus.UNHEALTHY),
    ((replica(1, reachable=False), replica(2, st.Lifecycle.STOPPING, reachable=True)),
     WorkloadStatus.UNHEALTHY),
    ((replica(1, st.Lifecycle.STOPPING),), WorkloadStatus.STOPPING),
])
def test_the_workload_status_follows_its_replicas(
    replicas: tuple[st.Replica, ...], status: WorkloadStatus
) -> None:
    """Stopped with no live replica, starting until one serves, unhealthy only when every
    serving replica's target is unreachable."""
    assert shared(*replicas).status is status


def test_workload_conditions_decide_over_any_replica() -> None:
    """An open episode makes the workload unauthenticated whichever replica is healthy,
    and each replica entry carries exactly the contract's keys."""
    episode = st.Condition(C.AUTHENTICATED, False, "UpstreamUnauthorized", "401", AT)
    record = shared(replica(1, reachable=True), replica(2, reachable=False),
                    conditions=(episode,))
    assert record.status is WorkloadStatus.UNAUTHENTICATED
    data = record.to_dict()
    assert [set(r) for r in data["replicas"]] == [{
        "id", "host", "pid", "proxy_url", "lifecycle", "reachable", "updated_at"}] * 2
    assert [r["reachable"] for r in data["replicas"]] == [True, False]


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:pw12345678@cache:6379/0", "redis://:<redacted>@cache:6379/0"),
    ("rediss://user:pw12345678@cache/1", "rediss://user:<redacted>@cache/1"),
    ("redis://cache:6379/0?password=pw12345678", "redis://cache:6379/0?password=<redacted>"),
    ("redis://cache", "redis://cache"),
])
def test_store_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    """Wherever a store URL is shown, its password (and any query value) is masked."""
    assert redact_store_url(url) == shown
    location = parse_store(url)
    assert location.display == shown and "pw12345678" not in repr(location)


async def test_set_running_from_any_runner_never_overwrites_unauthenticated(
    redis_server: RedisServer, gated_upstream: GatedUpstream, tmp_path: Path,
) -> None:
    """Two embedded replicas: a 401 through one makes the workload unauthenticated, and a
    runner saying "running" through the other gets that record back, unchanged."""
    token = write_secret(tmp_path / "token", gated_upstream.good)
    calls: list[object] = []

    def config() -> ProxyConfig:
        return ProxyConfig(target_url=gated_upstream.target, name="embedded",
                           store=redis_server.url, bearer_token_file=token,
                           health_interval=0, replica_ttl=1.5, state_dir=tmp_path)

    async with AuthProxy(config(), on_unauthorized=calls.append) as one, \
            AuthProxy(config(), on_unauthorized=calls.append) as two:
        gated_upstream.good = "revoked-0123456789"
        async with aiohttp.ClientSession() as session, session.post(one.url) as resp:
            assert resp.status == 503
        await one.monitor.flush()
        assert len(calls) == 1
        record = await two.set_running()
        assert record.status is WorkloadStatus.UNAUTHENTICATED
        assert len(record.replicas or ()) == 2  # one process, two replica ids
        assert not (tmp_path / "workloads").exists()  # nothing went to the file store
    assert two.status.status is WorkloadStatus.STOPPED

