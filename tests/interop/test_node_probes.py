"""Health probes alone end an auth episode in front of the TypeScript SDK's stateful
Streamable HTTP server (issue 13 item 1, the contract's rule 7).

The TS SDK's server, as `StreamableHTTPServerTransport` builds it by default, answers a
session-less `ping` with 400, so only an `initialize` can prove a healed token. The proxy
runs as its CLI with a token file; no MCP client runs in these tests, so everything the
TS server receives is a probe (none carries `X-Forwarded-For`, which the forwarding path
adds). Episodes are heard through `--on-unauthorized-exec`; the status is read from the
status file, as a runner waiting for `running` would.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .processes import (
    TOKEN,
    EpisodeListener,
    Processes,
    ProxyProcess,
    TsServer,
    start_proxy,
    start_ts_server,
)
from helpers import LONG_WAIT, eventually, write_secret

INTERVAL = 0.5
# The contract's bounds (two probe intervals; at once after a credential change, the token
# file being looked at every second) plus room for a loaded machine to write and read the
# status file. A proxy whose probes cannot prove never gets there at all.
SLACK = 6.0
HEAL_BOUND = 2 * INTERVAL + SLACK
FILE_CHECK = 1.0
CHANGE_BOUND = FILE_CHECK + SLACK
LONG_INTERVAL = 60.0


@pytest.fixture
async def episodes(tmp_path: Path) -> AsyncIterator[EpisodeListener]:
    """Hears every unauthorized episode the proxy's `--on-unauthorized-exec` reports."""
    listener = EpisodeListener(tmp_path)
    yield listener
    await listener.stop()


async def probed_ts_server(
    processes: Processes, episodes: EpisodeListener, *, token_in_file: str, interval: float
) -> tuple[TsServer, ProxyProcess, Path]:
    """The TS server accepting `TOKEN`, and the proxy's CLI in front of it probing every
    `interval` seconds with `token_in_file` as its credential; no client."""
    server = await start_ts_server(processes, TOKEN)
    token_file = write_secret(processes.tmp_path / "token", token_in_file)
    proxy = await start_proxy(
        processes, server.url("streamable"), token_file=token_file, name="ts-probes",
        extra=["--health-interval", str(interval), "--health-timeout", str(LONG_WAIT),
               "--on-unauthorized-exec", await episodes.start()],
    )
    return server, proxy, token_file


async def one_episode(proxy: ProxyProcess, episodes: EpisodeListener) -> None:
    """An episode opened with the target's reason, and the status file says so."""
    event = await episodes.next()
    assert event["status_code"] == 401 and event["error"] == "invalid_token"
    assert proxy.status()["status"] == "unauthenticated"  # written before the callback


async def running_within(proxy: ProxyProcess, bound: float) -> float:
    """Waits (at most `bound` seconds) for the status file to say `running`; the time it took."""
    started = time.monotonic()
    await eventually(lambda: proxy.status()["status"] == "running", bound,
                     what=f"`running` within {bound} s, by probes alone")
    return time.monotonic() - started


async def sessions_deleted(server: TsServer) -> bool:
    """The TS server issued a session, every one it issued got a DELETE answered 200, and
    it holds none."""
    sessions = await server.sessions()
    deleted = {r["headers"].get("mcp-session-id") for r in await server.seen()
               if r["method"] == "DELETE" and r["status"] == 200}
    return bool(sessions["issued"]) and sessions["open"] == [] and (
        set(sessions["issued"]) <= deleted)


async def only_probes_and_no_session_left(server: TsServer, proxy: ProxyProcess) -> None:
    """Nothing but the proxy's probes reached the TS server; every session a probe opened
    was deleted, and the server holds none; the token is in no log and no status."""
    try:
        await eventually(lambda: sessions_deleted(server), LONG_WAIT)
    except AssertionError:
        requests = [(r["method"], r["status"], r["headers"].get("mcp-session-id"))
                    for r in await server.seen()]
        raise AssertionError(f"a probe's session was left open: {await server.sessions()}; "
                             f"the server saw {requests}") from None
    seen = await server.seen()
    assert [r for r in seen if "x-forwarded-for" in r["headers"]] == []  # no client
    assert {(r["method"], r["path"]) for r in seen} <= {("POST", "/mcp"), ("DELETE", "/mcp")}
    assert TOKEN not in proxy.process.stderr()
    assert TOKEN not in json.dumps(proxy.status())


async def test_probes_alone_heal_the_ts_server_after_the_token_is_restored(
    processes: Processes, episodes: EpisodeListener
) -> None:
    """With `--health-interval 0.5` and no client, a token the TS server revokes and then
    accepts again takes the workload to `unauthenticated` once and back to `running`
    within two probe intervals (plus slack), and the probes leave no session open."""
    server, proxy, _ = await probed_ts_server(processes, episodes, token_in_file=TOKEN,
                                              interval=INTERVAL)
    # The start-up probe (an `initialize`, the token being new) is over, its session
    # deleted: revoked while that probe was under way, the token would get its DELETE
    # refused, and the session would stay open through no fault of the proxy.
    await eventually(lambda: sessions_deleted(server), LONG_WAIT, what="the start-up probe")
    await server.accept()  # revoked at the target
    await one_episode(proxy, episodes)

    async def probes_refused() -> bool:
        return len([r for r in await server.seen() if r["status"] == 401]) >= 3

    # Several probes are refused while the episode is open; it is still one episode.
    await eventually(probes_refused, LONG_WAIT, what="three probes refused in the episode")
    assert proxy.status()["status"] == "unauthenticated"

    await server.accept(TOKEN)  # and accepted again
    await running_within(proxy, HEAL_BOUND)
    assert episodes.events.empty(), "a second unauthorized episode was reported"
    await only_probes_and_no_session_left(server, proxy)


async def test_a_rewritten_token_file_is_probed_at_once(
    processes: Processes, episodes: EpisodeListener
) -> None:
    """With probes only every 60 s, fixing the token file while the workload is
    `unauthenticated` in front of the TS server is probed at once: `running` again within
    seconds, not a minute, and the probe's session is deleted."""
    server, proxy, token_file = await probed_ts_server(
        processes, episodes, token_in_file="a-stale-token", interval=LONG_INTERVAL
    )
    await one_episode(proxy, episodes)  # the first probe, at start, got the 401
    write_secret(token_file, TOKEN)
    await running_within(proxy, CHANGE_BOUND)
    assert episodes.events.empty(), "a second unauthorized episode was reported"
    await only_probes_and_no_session_left(server, proxy)

