"""OAuth across replicas: one refresh per expiry, rotation never broken, tokens encrypted."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.credentials.token_store import RedisTokenStore, TokenSet
from proxy.errors import StateError, StoreKeyMismatch

from .conftest import WAIT, RedisServer, Replica, free_port, start_replica
from helpers import eventually, write_secret

LIFETIME = 3.0  # seconds an access token lives: several expiry cycles in one test


def fernet_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


@dataclass
class RotatingAuth:
    """A token endpoint with refresh-token rotation and reuse detection, and the MCP
    target it protects (accepting only access tokens it issued that have not expired)."""

    refresh: str = field(default_factory=lambda: f"RT-0-{secrets.token_hex(8)}")
    access: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    grants: list[float] = field(default_factory=list)
    stale: int = 0  # refresh tokens presented after they were rotated out
    issued: list[str] = field(default_factory=list)

    async def token(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        if form.get("grant_type") != "refresh_token" or form.get("refresh_token") != (
                self.refresh):
            self.stale += 1
            return web.json_response({"error": "invalid_grant"}, status=400)
        n = len(self.grants) + 1
        self.grants.append(time.monotonic())
        access = f"AT-{n}-{secrets.token_hex(8)}"
        self.refresh = f"RT-{n}-{secrets.token_hex(8)}"
        self.access[access] = time.monotonic() + LIFETIME
        self.issued += [access, self.refresh]
        return web.json_response({"access_token": access, "token_type": "Bearer",
                                  "expires_in": LIFETIME, "refresh_token": self.refresh})

    async def mcp(self, request: web.Request) -> web.StreamResponse:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.access.get(token, 0) <= time.monotonic():
            return web.json_response({"error": "invalid_token"}, status=401, headers={
                "WWW-Authenticate": 'Bearer error="invalid_token"'})
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})


@pytest.fixture
async def auth() -> AsyncIterator[tuple[RotatingAuth, TestServer]]:
    state = RotatingAuth()
    app = web.Application()
    app.router.add_post("/token", state.token)
    app.router.add_route("*", "/mcp", state.mcp)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield state, server
    await server.close()


def oauth_flags(redis: RedisServer, server: TestServer, refresh: Path, key: Path,
                *extra: str) -> list[str]:
    return ["--target-url", str(server.make_url("/mcp")), "--name", "oauthed",
            "--store", redis.url, "--store-key-file", str(key),
            "--oauth-token-url", str(server.make_url("/token")), "--oauth-client-id", "cli",
            "--oauth-refresh-token-file", str(refresh), "--health-interval", "0",
            "--log-format", "json", *extra]


def as_bytes(value: object) -> bytes:
    """A reply of a client without `decode_responses`: bytes, whatever redis-py's types
    allow for."""
    assert isinstance(value, bytes), value
    return value


async def every_key(redis: RedisServer) -> list[bytes]:
    """Every value Redis holds, whatever its type."""
    client = redis.client()
    values: list[bytes] = []
    try:
        async for key in client.scan_iter():
            values.append(key)
            kind = as_bytes(await client.type(key)).decode()
            if kind == "string":
                values.append(as_bytes(await client.get(key)))
            elif kind == "set":
                values += [as_bytes(member) for member in await client.smembers(key)]
            else:
                values.append(repr(await client.dump(key)).encode())
    finally:
        await client.aclose()
    return values


async def test_replicas_refresh_once_per_expiry_and_never_reuse_a_rotated_token(
    redis_server: RedisServer, auth: tuple[RotatingAuth, TestServer], tmp_path: Path,
    replicas: list[Replica],
) -> None:
    """Three replicas over several token lifetimes: one refresh per expiry in all, never
    a rotated-out refresh token, every request answered — and Redis never holds a
    token in plaintext."""
    state, server = auth
    refresh = write_secret(tmp_path / "refresh", state.refresh)
    key = write_secret(tmp_path / "key", fernet_key())
    for _ in range(3):
        replicas.append(await start_replica(oauth_flags(redis_server, server, refresh, key),
                                            tunables={"replica_ttl": 1.5}))
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        # Requests through every replica across three token lifetimes.
        while time.monotonic() - started < 3 * LIFETIME:
            for replica in replicas:
                async with session.post(replica.url, json={}) as resp:
                    assert resp.status == 200, await resp.text()
            await asyncio.sleep(0.1)
    elapsed = time.monotonic() - state.grants[0]
    assert state.stale == 0  # no replica ever presented a rotated-out refresh token
    # The first grant at start, then one per lifetime (refreshed 10 % ahead of expiry),
    # whichever replica got there first: never two for one expiry.
    assert 3 <= len(state.grants) <= 1 + int(elapsed / (LIFETIME * 0.9))
    # Once all three run (a replica joining just before expiry may refresh early once):
    steady = [at for at in state.grants if at >= started]
    gaps = [b - a for a, b in itertools.pairwise(steady)]
    assert gaps and min(gaps) > LIFETIME * 0.8
    stored = b"\n".join(await every_key(redis_server))
    for token in state.issued:
        assert token.encode() not in stored
    assert state.refresh.encode() not in stored
    for replica in replicas:
        assert await replica.stop() == 0


async def test_a_value_copied_to_another_workload_or_read_with_another_key_is_refused(
    redis_server: RedisServer,
) -> None:
    """An encrypted token value is bound to its workload, origin and issuer: copied to
    another workload's key, or read with another key, it is StoreKeyMismatch."""
    client = redis_server.client()
    key = fernet_key().encode()

    def store(workload: str, key: bytes,
              issuer: str = "https://as.example/token") -> RedisTokenStore:
        return RedisTokenStore(client, workload=workload, key=key, issuer=issuer,
                               origin="https://mcp.example", lease=5.0, display="redis://test")

    one = store("one", key)
    two = store("two", key)
    try:
        await one.save(TokenSet("access-secret", "refresh-secret", None, None))
        assert (await one.load()) is not None
        raw = as_bytes(await client.get("mcp-authproxy:{one}:tokens"))
        assert b"access-secret" not in raw
        await client.set("mcp-authproxy:{two}:tokens", raw)  # copied across workloads
        with pytest.raises(StoreKeyMismatch, match="workload"):
            await two.load()
        other_key = store("one", fernet_key().encode())
        with pytest.raises(StoreKeyMismatch, match="decrypt"):
            await other_key.load()
        elsewhere = store("one", key, issuer="https://evil.example/token")
        with pytest.raises(StoreKeyMismatch, match="issuer"):
            await elsewhere.load()
    finally:
        await client.aclose()


async def test_a_replica_with_the_wrong_key_file_is_in_error_and_writes_nothing(
    redis_server: RedisServer, auth: tuple[RotatingAuth, TestServer], tmp_path: Path,
    replicas: list[Replica],
) -> None:
    """A replica whose key does not open the stored tokens says `error`
    (StoreKeyMismatch), answers 503, and leaves the stored tokens alone."""
    state, server = auth
    refresh = write_secret(tmp_path / "refresh", state.refresh)
    good_key = fernet_key()
    good = write_secret(tmp_path / "key", good_key)
    replicas.append(await start_replica(oauth_flags(redis_server, server, refresh, good),
                                        tunables={"replica_ttl": 1.5}))
    client = redis_server.client()
    reader = RedisTokenStore(
        client, workload="oauthed", key=good_key.encode(), lease=1.0,
        origin=str(server.make_url("/").origin()), issuer=str(server.make_url("/token")),
        display="test")
    async with aiohttp.ClientSession() as session:
        async with session.post(replicas[0].url, json={}) as resp:
            assert resp.status == 200
        wrong = write_secret(tmp_path / "wrong-key", fernet_key())
        admin = free_port()
        intruder = await start_replica(
            oauth_flags(redis_server, server, refresh, wrong, "--admin-port", str(admin)),
            tunables={"replica_ttl": 1.5})
        replicas.append(intruder)
        await intruder.wait_log("store_key_mismatch")
        async with session.get(f"http://127.0.0.1:{admin}/status") as resp:
            record = await resp.json()
        assert record["status"] == "error" and record["reason"] == "StoreKeyMismatch"
        async with session.post(intruder.url, json={}) as resp:
            assert resp.status == 503
        # What the store holds is still the good replica's (it refreshes every lifetime):
        # it opens with the good key and is the token the endpoint issued last.
        stored = await reader.load()
        assert stored is not None and stored.refresh_token == state.refresh
        await client.aclose()
    # The intruder never asked the token endpoint (its file's refresh token is rotated
    # out: it would have been refused as stale).
    assert state.stale == 0


async def test_without_the_store_a_replica_keeps_its_token_but_never_refreshes(
    redis_server: RedisServer, auth: tuple[RotatingAuth, TestServer], tmp_path: Path,
    replicas: list[Replica],
) -> None:
    """Redis down: the access token at hand serves until it expires, then 503 with
    Retry-After — no refresh outside the store's lock; Redis back: a refresh, and 200."""
    state, server = auth
    refresh = write_secret(tmp_path / "refresh", state.refresh)
    key = write_secret(tmp_path / "key", fernet_key())
    replica = await start_replica(oauth_flags(redis_server, server, refresh, key),
                                  tunables={"replica_ttl": 1.5})
    replicas.append(replica)
    async with aiohttp.ClientSession() as session:
        async with session.post(replica.url, json={}) as resp:
            assert resp.status == 200
        await redis_server.stop()
        grants = len(state.grants)
        async def expired() -> bool:
            async with session.post(replica.url, json={}) as resp:
                if resp.status == 503:
                    assert int(resp.headers["Retry-After"]) >= 1
                    return True
                assert resp.status == 200  # the token at hand, until it expires
                return False

        await eventually(expired, WAIT, every=0.1, what="a 503 once the token expired")
        assert len(state.grants) == grants  # nobody refreshed without the store
        await redis_server.start()  # empty: the replica puts back what it saved last
        async def served() -> bool:
            async with session.post(replica.url, json={}) as resp:
                return resp.status == 200

        await eventually(served, WAIT, every=0.1, what="a 200 once Redis is back")
    assert len(state.grants) == grants + 1 and state.stale == 0


async def test_the_refresh_lock_is_one_at_a_time_and_its_lease_ends_a_dead_holders_turn(
    redis_server: RedisServer,
) -> None:
    """Two replicas' token stores: the second waits while the first holds the refresh
    lock, gives up after its wait, and gets it once the dead holder's lease ran out."""
    client = redis_server.client()
    key = fernet_key().encode()

    def store() -> RedisTokenStore:
        return RedisTokenStore(client, workload="w", origin="https://mcp.example", key=key,
                               issuer="https://as.example/token", lease=0.6,
                               display="redis://test")

    first = store()
    second = store()
    loop = asyncio.get_running_loop()
    try:
        holder = first.lock(1.0)
        await holder.__aenter__()  # and never leaves: a replica that died holding it
        with pytest.raises(StateError, match="held by another replica"):
            async with second.lock(0.1):
                pass
        asked = loop.time()
        async with second.lock(WAIT):
            waited = loop.time() - asked
        assert 0.2 < waited < 0.6 + 1.0  # the rest of the lease, not the whole wait
    finally:
        await client.aclose()
