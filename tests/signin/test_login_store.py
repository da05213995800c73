"""`login --store`: one sign-in for every replica, kept encrypted in the shared Redis,
used, refreshed and healed by `run --oauth --store` replicas without a restart."""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from replicas.conftest import RedisServer, free_port, redis_server  # noqa: F401 (a fixture)
from yarl import URL

from proxy import AuthProxy, ProxyConfig
from proxy.config import parse_store
from proxy.credentials.token_store import RedisTokenStore, read_key
from proxy.status.redis import read_shared

from .conftest import AuthServer, Cli, Running, TargetFactory
from .target import ProtectedTarget
from .test_run_oauth import (
    WAIT,
    _eventually,
    call_tool,
    initialize,
    revoke_grant,
    scrape_metrics,
)
from helpers import eventually, write_secret

pytestmark = pytest.mark.timeout(150)
NAME = "shared"


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:  # noqa: F811 (the fixture)
    """The replicas suite's redis-server, under the name these tests use."""
    return redis_server


def store_flags(redis: RedisServer, key: Path) -> tuple[str, ...]:
    return ("--store", redis.url, "--store-key-file", str(key))


async def stored_signin(redis: RedisServer, key: Path, target: ProtectedTarget
                        ) -> dict[str, Any] | None:
    """The sign-in in the store, decrypted with the key (as a replica reads it)."""
    client = redis.client()
    try:
        store = RedisTokenStore(client, workload=NAME, origin=str(URL(target.url).origin()),
                                issuer=None, key=read_key(key), lease=5.0, display="test")
        return await store.load_signin()
    finally:
        await client.aclose()


async def every_value(redis: RedisServer) -> list[bytes]:
    """Every key in the store and everything stored under it, whatever its type."""
    client = redis.client()
    out: list[Any] = []
    try:
        async for key in client.scan_iter():
            out.append(key)
            kind = await client.type(key)
            kind = kind.decode() if isinstance(kind, bytes) else kind
            if kind == "string":
                out.append(await client.get(key))
            elif kind == "hash":
                for field, value in (await client.hgetall(key)).items():
                    out += [field, value]
            elif kind == "set":
                out += list(await client.smembers(key))
            elif kind == "zset":
                out += list(await client.zrange(key, 0, -1))
            elif kind == "list":
                out += list(await client.lrange(key, 0, -1))
    finally:
        await client.aclose()
    return [v if isinstance(v, bytes) else str(v).encode() for v in out]


async def status(redis: RedisServer) -> dict[str, Any]:
    records = await read_shared(parse_store(redis.url), NAME)
    return records[0].to_dict() if records else {}


@contextlib.asynccontextmanager
async def two_replicas(cli: Cli, tmp_path: Path, target: ProtectedTarget,
                       flags: tuple[str, ...]) -> AsyncIterator[list[str]]:
    """Two `run --oauth --store` processes, each with a state dir of its own."""
    async with contextlib.AsyncExitStack() as stack:
        urls = []
        for n in (1, 2):
            running: Running = await stack.enter_async_context(cli.started(
                "run", "--oauth", "--target-url", target.url, "--name", NAME,
                "--state-dir", str(tmp_path / f"replica{n}"), "--health-interval", "0",
                *flags))
            urls.append(await running.stdout_line())
        yield urls


async def test_login_store_signs_every_replica_in_and_heals_them(
        cli: Cli, tmp_path: Path, authserver: AuthServer, target: ProtectedTarget,
        redis: RedisServer) -> None:
    """`login --store` puts the sign-in in Redis, encrypted (no token in any key); two
    replicas serve an SDK client with it; a revoked grant makes them LoginRequired, and
    a second `login --store` brings both back to running without a restart."""
    key = write_secret(tmp_path / "store.key", base64.urlsafe_b64encode(
        os.urandom(32)).decode())
    flags = store_flags(redis, key)
    login = await cli.login("--target-url", target.url, "--name", NAME, *flags)
    assert login.code == 0, login.stderr
    assert not cli.signin_file(NAME).exists()  # the store holds it, not this machine
    first = await stored_signin(redis, key, target)
    assert first is not None and first["target_url"] == target.url
    values = b"\n".join(await every_value(redis))
    for secret in (first["access_token"], first["refresh_token"]):
        assert secret.encode() not in values and secret not in login.stdout + login.stderr

    async with two_replicas(cli, tmp_path, target, flags) as urls, \
            aiohttp.ClientSession() as session:
        for url in urls:
            assert await call_tool(url, "echo", "replica") == "echo: replica"
        assert await _wait_status(redis, "running")

        await revoke_grant(authserver, first)

        async def refused_everywhere() -> bool:
            answers = [await initialize(session, url) for url in urls]
            return all(code == 503 and b"mcp-authproxy login" in body
                       for code, _, body in answers)

        refused: bool = await eventually(refused_everywhere, WAIT, every=0.2,
                                         what="both replicas LoginRequired")
        assert refused
        assert await _wait_status(redis, "unauthenticated")
        during = await status(redis)
        assert during["reason"] == "LoginRequired", during

        again = await cli.login(NAME, *flags)  # the target: the shared record's
        assert again.code == 0, again.stderr
        second = await stored_signin(redis, key, target)
        assert second is not None and second["signin_id"] != first["signin_id"]
        for url in urls:
            assert await _eventually(url, "echo", "healed") == "echo: healed"
        assert await _wait_status(redis, "running")

    values = b"\n".join(await every_value(redis))
    for signin in (first, second):
        for field in ("access_token", "refresh_token"):
            assert signin[field].encode() not in values
    assert second["access_token"] in target.settings.seen_tokens


async def _wait_status(redis: RedisServer, wanted: str) -> bool:
    async def holds() -> bool:
        return (await status(redis)).get("status") == wanted

    reached: bool = await eventually(holds, WAIT, what=f"the shared status {wanted}")
    return reached


async def test_login_store_needs_its_key(cli: Cli) -> None:
    """`login --store redis://` without `--store-key-file` is one line naming the flag."""
    result = await cli.login("--target-url", "https://mcp.example.com/mcp",
                             "--store", "redis://127.0.0.1:1/0")
    assert result.code == 2
    assert "--store-key-file" in result.stderr
    assert "Traceback" not in result.stderr


async def test_replicas_refresh_the_stored_sign_in_without_breaking_rotation(
        cli: Cli, tmp_path: Path, short_lived_authserver: AuthServer,
        make_target: TargetFactory, redis: RedisServer) -> None:
    """Tokens living 3 s: the replicas refresh under the store's lock, the rotated
    refresh token lands in the store (same sign-in), and both keep serving."""
    target = await make_target(short_lived_authserver)
    key = write_secret(tmp_path / "store.key", base64.urlsafe_b64encode(
        os.urandom(32)).decode())
    flags = store_flags(redis, key)
    assert (await cli.login("--target-url", target.url, "--name", NAME, *flags)).code == 0
    first = await stored_signin(redis, key, target)
    assert first is not None

    async with two_replicas(cli, tmp_path, target, flags) as urls:
        async def rotated() -> dict[str, Any] | None:
            now = await stored_signin(redis, key, target)
            return now if now and now["refresh_token"] != first["refresh_token"] else None

        second = await eventually(rotated, WAIT, what="a rotated token")
        assert second is not None
        for url in urls:
            assert await call_tool(url, "echo", "later") == "echo: later"
        assert await _wait_status(redis, "running")

    assert second["signin_id"] == first["signin_id"]
    assert second["access_token"] != first["access_token"]
    assert second["access_token"] in target.settings.seen_tokens


async def test_a_replica_with_another_key_never_uses_the_stored_sign_in(
        cli: Cli, tmp_path: Path, target: ProtectedTarget, redis: RedisServer) -> None:
    """A replica whose `--store-key-file` is not the key `login --store` used says
    `error` (StoreKeyMismatch), answers 503 and sends no token to the target."""
    right = write_secret(tmp_path / "right.key", base64.urlsafe_b64encode(
        os.urandom(32)).decode())
    wrong = write_secret(tmp_path / "wrong.key", base64.urlsafe_b64encode(
        os.urandom(32)).decode())
    login = await cli.login("--target-url", target.url, "--name", NAME,
                            *store_flags(redis, right))
    assert login.code == 0, login.stderr
    before = len(target.settings.seen_tokens)
    admin = free_port()
    async with cli.started("run", "--oauth", "--target-url", target.url, "--name", NAME,
                           "--state-dir", str(tmp_path / "replica"), "--health-interval",
                           "0", "--admin-port", str(admin), *store_flags(redis, wrong)
                           ) as running, aiohttp.ClientSession() as session:
        url = await running.stdout_line()
        await running.stderr_line("store_key_mismatch")
        async with session.get(f"http://127.0.0.1:{admin}/status") as response:
            record = await response.json()
        code, _, _ = await initialize(session, url)
    assert record["status"] == "error" and record["reason"] == "StoreKeyMismatch", record
    assert code == 503
    assert target.settings.seen_tokens[before:] == []


async def test_token_expiry_is_known_from_the_stored_sign_in(
        cli: Cli, tmp_path: Path, target: ProtectedTarget, redis: RedisServer) -> None:
    """A replica started from the sign-in `login --store` put in the store shows that
    token's remaining lifetime on /metrics at once, before any refresh."""
    key = write_secret(tmp_path / "store.key", base64.urlsafe_b64encode(
        os.urandom(32)).decode())
    flags = store_flags(redis, key)
    assert (await cli.login("--target-url", target.url, "--name", NAME, *flags)).code == 0
    stored = await stored_signin(redis, key, target)
    assert stored is not None
    config = ProxyConfig(target_url=target.url, name=NAME, state_dir=tmp_path / "replica",
                         oauth=True, store=redis.url, store_key_file=key,
                         health_interval=0, admin_port=0)
    async with AuthProxy(config) as running:
        samples = await scrape_metrics(running.admin_port)
        remaining = (datetime.fromisoformat(stored["expires_at"])
                     - datetime.now(UTC)).total_seconds()

    expiry = samples["mcp_authproxy_token_expiry_seconds"]
    assert abs(expiry - remaining) < 30, (expiry, remaining)
    assert samples["mcp_authproxy_token_refreshes_total{outcome=success}"] == 0
