"""A small runner process that embeds mcp-authproxy, as a platform would.

It starts the proxy in front of a remote MCP server, says "running" once its own
start-up is done (and again every few seconds, as a supervisor loop would: the proxy
keeps `unauthenticated` regardless), and when the proxy reports an unauthorized
episode it prints what a person should do.

    python examples/runner.py --target-url https://mcp.example.com/mcp \
        --bearer-token-file ~/.config/example/token [--name NAME] [--state-dir DIR]
        [--seconds N]

Prints the proxy URL on stdout, every status change and the advice on stderr.
Stops on SIGINT/SIGTERM or after --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from proxy import AuthProxy, ProxyConfig, ReauthorizedEvent, UnauthorizedEvent
from proxy.log import configure


def advise(event: UnauthorizedEvent) -> None:
    """What a person should do, from what the remote server said."""
    print(f"[runner] workload {event.workload} is unauthenticated: {event.message}",
          file=sys.stderr, flush=True)
    if event.status_code is None:
        print(f"[runner] fix the credential source ({event.reason}); the proxy picks it up "
              "without a restart", file=sys.stderr, flush=True)
    elif event.error == "invalid_token":
        print("[runner] the token was rejected: write a fresh token to the token file",
              file=sys.stderr, flush=True)
    else:
        print("[runner] the server refused the credential: check it with the server's owner",
              file=sys.stderr, flush=True)
    if event.resource_metadata:
        print(f"[runner] the server's auth metadata: {event.resource_metadata}",
              file=sys.stderr, flush=True)


def reauthorized(event: ReauthorizedEvent) -> None:
    print(f"[runner] workload {event.workload} is authenticated again",
          file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> int:
    config = ProxyConfig(target_url=args.target_url, name=args.name, state_dir=args.state_dir,
                         bearer_token_file=args.bearer_token_file,
                         health_interval=args.health_interval)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with AuthProxy(config, on_unauthorized=advise, on_reauthorized=reauthorized) as proxy:
        print(proxy.url, flush=True)
        last = None
        deadline = loop.time() + args.seconds if args.seconds else None
        while not stop.is_set():
            # The runner's own start-up/supervision says "running"; the proxy decides.
            record = await proxy.set_running()
            if record.status != last:
                print(f"[runner] status: {record.status} ({record.reason})", file=sys.stderr,
                      flush=True)
                last = record.status
            timeout = args.tick
            if deadline is not None:
                timeout = min(timeout, max(deadline - loop.time(), 0))
                if timeout == 0:
                    break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-url", required=True)
    parser.add_argument("--bearer-token-file")
    parser.add_argument("--name")
    parser.add_argument("--state-dir")
    parser.add_argument("--health-interval", type=float, default=30.0)
    parser.add_argument("--tick", type=float, default=2.0, help="seconds between set_running")
    parser.add_argument("--seconds", type=float, default=0, help="stop after N s (0 = never)")
    args = parser.parse_args()
    configure("info", None)
    try:
        return asyncio.run(run(args))
    except ValueError as exc:  # ProxyConfig names the bad option
        print(f"runner: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
