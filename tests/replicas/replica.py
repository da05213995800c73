"""A replica process for the tests: `mcp-authproxy run` with shortened tunables.

The CLI has no flag for tunables (`replica_ttl`, ...); this parses the real `run`
flags (`config_from_args`), replaces a few tunables, and serves like the CLI does
(one stdout line, the URL; SIGTERM stops), with both callbacks appending one JSON line
per call to `--events FILE` (tagged with the pid).
Usage: python replica.py [--events FILE] [--tunable NAME=SECONDS ...] -- <run flags>
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from proxy import AuthProxy, ProxyConfig, ReauthorizedEvent, UnauthorizedEvent, log
from proxy.cli.main import build_parser, config_from_args


def _writer(path: str, kind: str) -> Callable[[UnauthorizedEvent | ReauthorizedEvent], None]:
    def write(event: UnauthorizedEvent | ReauthorizedEvent) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, "pid": os.getpid(), **event.to_dict()}) + "\n")

    return write


def main(argv: list[str]) -> int:
    split = argv.index("--")
    ours, run_flags = argv[:split], argv[split + 1:]
    events: str | None = None
    # fields named at run time, so their types are unknown here: replace() checks names
    tunables: dict[str, Any] = {}
    while ours:
        flag = ours.pop(0)
        if flag == "--events":
            events = ours.pop(0)
        elif flag == "--tunable":
            name, _, value = ours.pop(0).partition("=")
            tunables[name] = float(value)
    args = build_parser().parse_args(["run", *run_flags])
    try:
        config = dataclasses.replace(config_from_args(args), **tunables)
    except ValueError as exc:
        print(f"mcp-authproxy: error: {exc}", file=sys.stderr)
        return 2
    log.configure(config.log_level, "json")
    try:
        return asyncio.run(_serve(config, events))
    finally:
        log.flush()


def _dump_tasks() -> None:
    """SIGUSR1: every task's stack to stderr, so a test whose replica will not stop
    can say where it hangs."""
    for task in asyncio.all_tasks():
        task.print_stack(limit=12, file=sys.stderr)
    sys.stderr.flush()


async def _serve(config: ProxyConfig, events: str | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
    on_unauthorized = None if events is None else _writer(events, "unauthorized")
    on_reauthorized = None if events is None else _writer(events, "reauthorized")
    async with AuthProxy(config, on_unauthorized=on_unauthorized,
                         on_reauthorized=on_reauthorized) as running:
        sys.stdout.write(running.url + "\n")
        sys.stdout.flush()
        await stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
