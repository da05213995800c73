"""`--store`, `--store-key-file` and `status --store` as a user types them."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from .conftest import WAIT, GatedUpstream, RedisServer, Replica, free_port, start_replica
from helpers import eventually, run_cli, write_secret

PASSWORD = "s3cret-store-password"
KEY = "u7Zx0kqmv9P4cC1m8dQ7R0bW3hY6tL2nF5sJ8aE1gKo="  # 32 bytes, URL-safe base64


async def cli(*args: str) -> tuple[int, str, str]:
    """The CLI with no store in its environment but what the arguments say."""
    env = {k: v for k, v in os.environ.items() if k != "MCP_AUTHPROXY_STORE"}
    return await run_cli(args, env, timeout=WAIT)


@pytest.mark.parametrize(("flags", "flag"), [
    (["--store", "memcached://u:pw-in-url-123@h:1"], "--store"),
    (["--store", "redis://"], "--store"),
    (["--store", "redis://:pw-in-url-123@h:1/zero"], "--store"),
    (["--store", "redis://h:1/0", "--oauth-token-url", "http://127.0.0.1:9/token",
      "--oauth-client-id", "c"], "--store-key-file"),
])
async def test_bad_store_flags_exit_2_with_one_line_naming_the_flag(
    flags: list[str], flag: str
) -> None:
    """A mistyped store is refused before anything starts, naming the flag, never
    echoing the password it may carry."""
    code, out, err = await cli("run", "--target-url", "http://127.0.0.1:9/mcp", *flags)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"mcp-authproxy: error: {flag}:")
    assert "pw-in-url-123" not in err


async def test_a_key_file_others_can_read_or_that_is_no_fernet_key_is_refused(
    tmp_path: Path,
) -> None:
    """The key that encrypts tokens must be a Fernet key in a file of mode 0600."""
    key = tmp_path / "key"
    key.write_text(KEY)
    key.chmod(0o644)
    base = ["run", "--target-url", "http://127.0.0.1:9/mcp", "--store", "redis://h:1/0",
            "--store-key-file", str(key)]
    code, _, err = await cli(*base)
    assert code == 2 and err.startswith("mcp-authproxy: error: --store-key-file:")
    assert "0600" in err
    key.chmod(0o600)
    key.write_text("not-a-key")
    code, _, err = await cli(*base)
    assert code == 2 and "Fernet key" in err and len(err.strip().splitlines()) == 1


@pytest.fixture
async def locked_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server that wants a password."""
    directory = tmp_path / "redis-pw"
    directory.mkdir()
    server = RedisServer(directory, password=PASSWORD)
    await server.start()
    yield server
    await server.stop()


async def test_a_store_password_is_redacted_in_logs_status_output_and_admin_status(
    locked_redis: RedisServer, gated_upstream: GatedUpstream, tmp_path: Path,
    replicas: list[Replica],
) -> None:
    """Two replicas behind a password-protected Redis: `status --store` lists both, and
    the password shows up nowhere — not in logs, the table, the JSON, or /status."""
    token = write_secret(tmp_path / "token", gated_upstream.good)
    admin = free_port()
    for extra in (["--admin-port", str(admin)], []):
        replicas.append(await start_replica(
            ["--target-url", gated_upstream.target, "--name", "shared", "--store",
             locked_redis.url, "--bearer-token-file", str(token), "--health-interval",
             "0", "--log-format", "json", "--log-level", "debug", *extra],
            tunables={"replica_ttl": 2.0}))
    async def both_listed() -> str | None:
        code, out, _ = await cli("status", "shared", "--store", locked_redis.url, "--json")
        return out if code == 0 and len(json.loads(out)["replicas"]) == 2 else None

    out = await eventually(both_listed, WAIT, every=0.1, what="two replicas listed")
    record = json.loads(out)
    assert record["status"] == "running"
    assert {r["pid"] for r in record["replicas"]} == {r.pid for r in replicas}
    code, table, err = await cli("status", "--store", locked_redis.url)
    assert code == 0, err
    assert "shared" in table and "running" in table and "<redacted>" in table
    async with aiohttp.ClientSession() as session:
        async with session.post(replicas[0].url, json={}) as resp:
            assert resp.status == 200
        async with session.get(f"http://127.0.0.1:{admin}/status") as resp:
            admin_status = await resp.text()
    assert len(json.loads(admin_status)["replicas"]) == 2
    for replica in replicas:
        await replica.stop()
    logs = "".join(line for r in replicas for line in r.lines)
    listening = replicas[0].events("listening")[0]
    assert listening["store"] == f"redis://:<redacted>@127.0.0.1:{locked_redis.port}/0"
    for text in (out, table, err, admin_status, logs):
        assert PASSWORD not in text
    # A wrong password: one line naming the flag, the password still redacted.
    wrong = locked_redis.url.replace(PASSWORD, "wrong-password-xyz")
    code, out, err = await cli("status", "--store", wrong)
    assert code == 1 and err.startswith("mcp-authproxy: error: --store:")
    assert "wrong-password-xyz" not in err and len(err.strip().splitlines()) == 1


async def test_a_bad_store_from_the_environment_names_the_flag() -> None:
    """MCP_AUTHPROXY_STORE is read like --store, and refused the same way."""
    code, out, err = await run_cli(
        ["run", "--target-url", "http://127.0.0.1:9/mcp"],
        {**os.environ, "MCP_AUTHPROXY_STORE": "postgres://u:pw-in-env-123@db/1"},
        timeout=WAIT)
    assert code == 2 and out == ""
    assert err.startswith("mcp-authproxy: error: --store:")
    assert "pw-in-env-123" not in err


async def test_a_rediss_store_with_a_private_ca_is_shared_over_tls(
    tmp_path: Path, gated_upstream: GatedUpstream, replicas: list[Replica],
) -> None:
    """rediss:// with the CA named in the URL (redis-py's ssl_ca_certs option): the
    replica joins over TLS and `status --store` reads the record the same way."""
    directory = tmp_path / "redis-tls"
    directory.mkdir()
    server = RedisServer(directory, tls=True)
    await server.start()
    try:
        token = write_secret(tmp_path / "token", gated_upstream.good)
        replicas.append(await start_replica(
            ["--target-url", gated_upstream.target, "--name", "tls", "--store", server.url,
             "--bearer-token-file", str(token), "--health-interval", "0",
             "--log-format", "json"], tunables={"replica_ttl": 2.0}))

        async def listed() -> str | None:
            code, out, _ = await cli("status", "tls", "--store", server.url, "--json")
            return out if code == 0 and json.loads(out)["replicas"] else None

        record = json.loads(await eventually(listed, WAIT, what="the replica over TLS"))
        assert record["status"] == "running"
        assert [r["pid"] for r in record["replicas"]] == [replicas[0].pid]
        assert not replicas[0].events("store_unavailable")
    finally:
        await server.stop()
