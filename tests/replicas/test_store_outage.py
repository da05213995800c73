"""Replicas when things break: a replica killed, Redis stopped, Redis not there yet."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp

from .conftest import (
    GatedUpstream,
    RedisServer,
    Replica,
    free_port,
    post,
    refused,
    shared_record,
    start_replica,
    wait_lines,
    wait_record,
)
from helpers import write_secret


def _flags(redis_url: str, upstream: GatedUpstream, token_file: Path, *extra: str
           ) -> list[str]:
    return ["--target-url", upstream.target, "--name", "shared", "--store", redis_url,
            "--bearer-token-file", str(token_file), "--health-interval", "0",
            "--log-format", "json", *extra]


def _token(tmp_path: Path, upstream: GatedUpstream) -> Path:
    return write_secret(tmp_path / "token", upstream.good)


async def test_a_killed_replica_drops_out_after_replica_ttl(
    redis_server: RedisServer, gated_upstream: GatedUpstream, tmp_path: Path,
    replicas: list[Replica],
) -> None:
    """kill -9 leaves no goodbye: the replica's entry expires after replica_ttl, and the
    workload stays running on the other one."""
    token = _token(tmp_path, gated_upstream)
    for _ in range(2):
        replicas.append(await start_replica(_flags(redis_server.url, gated_upstream, token),
                                            tunables={"replica_ttl": 1.0}))
    await wait_record(redis_server, lambda r: len(r.get("replicas", ())) == 2)
    victim, survivor = replicas
    await victim.stop(signal.SIGKILL)
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    record = await wait_record(redis_server, lambda r: [x["pid"] for x in r["replicas"]]
                               == [survivor.pid])
    assert loop.time() - killed_at <= 1.0 + 1.0  # the TTL, plus one poll and a margin
    assert record["status"] == "running"


async def test_redis_stopped_mid_run_forwarding_continues_and_the_record_comes_back(
    redis_server: RedisServer, gated_upstream: GatedUpstream, tmp_path: Path,
    replicas: list[Replica],
) -> None:
    """With Redis gone, requests are still forwarded and /readyz stays 200; one WARN on
    the loss; a status change meanwhile (an episode) is written when Redis is back, with
    its callback run then, and one INFO on recovery."""
    token = _token(tmp_path, gated_upstream)
    events = tmp_path / "events.jsonl"
    admin = free_port()
    replica = await start_replica(
        _flags(redis_server.url, gated_upstream, token, "--admin-port", str(admin)),
        events=events, tunables={"replica_ttl": 1.0})
    replicas.append(replica)
    await wait_record(redis_server, lambda r: r.get("status") == "running")

    await redis_server.stop()
    async with aiohttp.ClientSession() as session:
        status, _ = await post(session, replica.url)
        assert status == 200  # forwarding does not wait for the store
        await replica.wait_log("store_unavailable")
        gated_upstream.good = "revoked-0123456789"
        assert refused(*await post(session, replica.url))
        async with session.get(f"http://127.0.0.1:{admin}/readyz") as resp:
            assert resp.status == 200
        async with session.get(f"http://127.0.0.1:{admin}/status") as resp:
            assert resp.status == 200
        # The episode is not recorded yet, so its callback has not run.
        assert not events.exists()

        await redis_server.start()  # an empty Redis: persistence is off
        await replica.wait_log("store_recovered")
        record = await wait_record(redis_server, lambda r: r.get("status") == "unauthenticated")
        assert [x["pid"] for x in record["replicas"]] == [replica.pid]
        assert len(await wait_lines(events, 1)) == 1
    assert len(replica.events("store_unavailable")) == 1
    assert len(replica.events("store_recovered")) == 1
    # Redis gone again: SIGTERM still ends the replica promptly and cleanly.
    await redis_server.stop()
    loop = asyncio.get_running_loop()
    asked = loop.time()
    assert await replica.stop() == 0
    assert loop.time() - asked < 5.0


async def test_a_replica_starts_while_redis_is_down_and_joins_when_it_comes_up(
    tmp_path: Path, gated_upstream: GatedUpstream, replicas: list[Replica],
) -> None:
    """A replica whose store is unreachable still starts and forwards, and keeps trying
    until the store is there; then it appears in the shared record."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)  # not started yet
    token = _token(tmp_path, gated_upstream)
    replica = await start_replica(_flags(server.url, gated_upstream, token),
                                  tunables={"replica_ttl": 1.0})
    replicas.append(replica)
    async with aiohttp.ClientSession() as session:
        assert (await post(session, replica.url))[0] == 200
    await replica.wait_log("store_unavailable")
    await server.start()
    try:
        record = await wait_record(server, lambda r: r.get("status") == "running")
        assert [x["pid"] for x in record["replicas"]] == [replica.pid]
        assert await replica.stop() == 0
        assert (await shared_record(server))["status"] == "stopped"
    finally:
        await server.stop()
