"""Three replica processes, one Redis, one 401-gating target: one workload, one episode."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import (
    WAIT,
    GatedUpstream,
    RedisServer,
    Replica,
    free_port,
    post,
    read_lines,
    refused,
    shared_record,
    start_replica,
    wait_lines,
    wait_record,
)
from helpers import eventually, write_secret


def _flags(redis: RedisServer, upstream: GatedUpstream, token_file: Path,
           *extra: str) -> list[str]:
    return ["--target-url", upstream.target, "--name", "shared", "--store", redis.url,
            "--bearer-token-file", str(token_file), "--health-interval", "0",
            "--log-format", "json", *extra]


async def test_three_replicas_share_one_episode_and_one_callback(
    redis_server: RedisServer, gated_upstream: GatedUpstream, tmp_path: Path,
    replicas: list[Replica],
) -> None:
    """A revoked token seen by three replicas at once fires one callback in all; a proof
    through another replica ends the episode; the next episode fires exactly one more."""
    token = write_secret(tmp_path / "token", gated_upstream.good)
    events = tmp_path / "events.jsonl"
    for _ in range(3):
        replicas.append(await start_replica(
            _flags(redis_server, gated_upstream, token), events=events,
            tunables={"replica_ttl": 1.5}))
    record = await wait_record(redis_server, lambda r: len(r.get("replicas", ())) == 3 and all(
        x["lifecycle"] == "serving" for x in r["replicas"]))
    assert record["status"] == "running"
    assert {x["pid"] for x in record["replicas"]} == {r.pid for r in replicas}
    assert all(set(x) == {"id", "host", "pid", "proxy_url", "lifecycle", "reachable",
                          "updated_at"} for x in record["replicas"])

    gated_upstream.good = "token-two-0123456789"  # the target revokes the token
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(post(session, r.url) for r in replicas
                                         for _ in range(4)))
        # The proxy owns the credential: clients get 503 naming the workload, never 401.
        assert all(refused(status, body) for status, body in answers)
        lines = await wait_lines(events, 1)
        record = await wait_record(redis_server, lambda r: r["status"] == "unauthenticated")
        assert record["reason"] == "UpstreamUnauthorized"
        opener = lines[0]["pid"]
        assert lines[0]["kind"] == "unauthorized" and opener in {r.pid for r in replicas}

        # The target takes the token again; a request through a replica that did not
        # open the episode proves it and ends it for the workload.
        gated_upstream.good = "token-one-0123456789"
        other = next(r for r in replicas if r.pid != opener)
        assert (await post(session, other.url))[0] == 200
        record = await wait_record(redis_server, lambda r: r["status"] == "running")
        lines = await wait_lines(events, 2)
        assert lines[1]["kind"] == "reauthorized" and lines[1]["pid"] == other.pid

        gated_upstream.good = "token-two-0123456789"  # a second episode
        third = replicas[2]
        # A replica learns of an episode another one ended within a sync interval
        # (replica_ttl / 3 here); until then a 401 may belong to the old episode.
        async def reopened() -> list[dict[str, Any]] | None:
            assert refused(*await post(session, third.url))
            lines = await asyncio.to_thread(read_lines, events)
            return lines if len(lines) >= 3 else None

        lines = await eventually(reopened, WAIT, every=0.1, what="a second episode")
        assert lines[2]["kind"] == "unauthorized"

    for replica in replicas:
        assert await replica.stop(signal.SIGTERM) == 0
    lines = read_lines(events)
    assert [x["kind"] for x in lines] == ["unauthorized", "reauthorized", "unauthorized"]
    # Every replica gone: the shared record says so.
    record = await shared_record(redis_server)
    assert record["status"] == "stopped" and record["replicas"] == []


async def test_a_replica_that_never_saw_the_401_ends_the_episode_with_its_proof(
    redis_server: RedisServer, gated_upstream: GatedUpstream, tmp_path: Path,
    replicas: list[Replica],
) -> None:
    """Replica A opens the episode; replica B, which never got a 401, hears of it from
    the store (its own /status says so) and its next good answer ends it."""
    token = write_secret(tmp_path / "token", gated_upstream.good)
    events = tmp_path / "events.jsonl"
    admin = free_port()
    a = await start_replica(_flags(redis_server, gated_upstream, token), events=events,
                            tunables={"replica_ttl": 30.0})
    b = await start_replica(_flags(redis_server, gated_upstream, token, "--admin-port",
                                   str(admin)), events=events, tunables={"replica_ttl": 30.0})
    replicas += [a, b]
    gated_upstream.good = "token-two-0123456789"
    async with aiohttp.ClientSession() as session:
        assert refused(*await post(session, a.url))
        assert (await wait_lines(events, 1))[0]["pid"] == a.pid
        gated_upstream.good = "token-one-0123456789"

        async def b_knows() -> bool:
            async with session.get(f"http://127.0.0.1:{admin}/status") as resp:
                status: str = (await resp.json())["status"]
                return status == "unauthenticated"

        await eventually(b_knows, WAIT, what="replica B's /status says unauthenticated")
        assert (await post(session, b.url))[0] == 200
        await wait_record(redis_server, lambda r: r["status"] == "running")
        lines = await wait_lines(events, 2)
    assert [(x["kind"], x["pid"]) for x in lines] == [("unauthorized", a.pid),
                                                      ("reauthorized", b.pid)]
