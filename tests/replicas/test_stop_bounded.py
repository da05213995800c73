"""A replica exits on SIGTERM within a bound whatever its store does."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from .conftest import GatedUpstream, RedisServer, Replica, start_replica, wait_record
from helpers import write_secret


async def test_a_replica_whose_redis_froze_still_exits_on_sigterm(
    redis_server: RedisServer, gated_upstream: GatedUpstream, tmp_path: Path,
    replicas: list[Replica],
) -> None:
    """Redis stops answering (SIGSTOP: the socket stays open, nothing comes back): a
    SIGTERM still ends the replica, within the drain timeout plus the store's bounds."""
    token = write_secret(tmp_path / "token", gated_upstream.good)
    replica = await start_replica(
        ["--target-url", gated_upstream.target, "--name", "shared", "--store",
         redis_server.url, "--bearer-token-file", str(token), "--health-interval", "0",
         "--log-format", "json"], tunables={"replica_ttl": 1.5, "drain_timeout": 1.0})
    replicas.append(replica)
    await wait_record(redis_server, lambda r: r.get("status") == "running")
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await replica.stop(signal.SIGTERM) == 0
        took = loop.time() - started
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    # drain_timeout bounds the goodbye, CLOSE_GRACE the client's close; 4.3 s here.
    assert took < 1.0 + 1.0 + 2.0 + 2.0, "".join(replica.lines)
