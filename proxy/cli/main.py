"""The command line: argparse -> `ProxyConfig` -> `AuthProxy`, and the exit codes.

`main(argv)` is callable from tests and returns the exit code: 0 after a clean
shutdown, 2 for bad flags or configuration (one line naming the flag, never a
traceback), 1 for any other failure. Only `run` prints to stdout, exactly one line:
the URL a client should use.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..config import LOG_LEVELS, ProxyConfig, default_state_dir
from ..errors import ConfigError, NameInUse
from .login import add_login_parser, both, login_main, signin_command, start_step_ups

PROG = "mcp-authproxy"

# flag -> environment variable read when the flag is absent (contract table).
ENV_FALLBACKS = {
    "target_url": "MCP_AUTHPROXY_TARGET_URL",
    "host": "MCP_AUTHPROXY_HOST",
    "port": "MCP_AUTHPROXY_PORT",
    "name": "MCP_AUTHPROXY_NAME",
    "state_dir": "MCP_AUTHPROXY_STATE_DIR",
    "store": "MCP_AUTHPROXY_STORE",
}


class UsageError(Exception):
    """A bad command line; its message is printed as one line and the exit code is 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _number(kind: type[int] | type[float], *, minimum: float = 0) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if value != value or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum:g}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A transparent, credential-injecting reverse "
                     "proxy for one remote MCP server.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser("run", help="run the proxy in the foreground")
    run.add_argument("--target-url", metavar="URL",
                     help="the remote MCP endpoint, http:// or https:// "
                     "[env MCP_AUTHPROXY_TARGET_URL] (required)")
    run.add_argument("--host", help="address to bind [env MCP_AUTHPROXY_HOST] (127.0.0.1)")
    run.add_argument("--port", type=_number(int), metavar="N",
                     help="port to bind, 0 = a free port [env MCP_AUTHPROXY_PORT] (0)")
    run.add_argument("--name", help="workload name, [A-Za-z0-9._-]{1,64} "
                     "[env MCP_AUTHPROXY_NAME] (the target's host name)")
    run.add_argument("--state-dir", metavar="DIR", help="where status files live "
                     "[env MCP_AUTHPROXY_STATE_DIR] ($XDG_STATE_HOME/mcp-authproxy)")
    run.add_argument("--store", metavar="URL", help="where the workload record lives: 'file' "
                     "(under --state-dir) or redis:// / rediss://, shared by replicas "
                     "[env MCP_AUTHPROXY_STORE] (file)")
    run.add_argument("--store-key-file", metavar="PATH", help="Fernet key encrypting the "
                     "tokens kept in a shared store (required with OAuth and redis://)")
    cred = run.add_argument_group("outgoing credential (at most one source)")
    cred.add_argument("--bearer-token-file", metavar="PATH",
                      help="send 'Authorization: Bearer <file contents>'; re-read on change")
    cred.add_argument("--bearer-token-env", metavar="VAR",
                      help="send 'Authorization: Bearer $VAR'")
    cred.add_argument("--oauth-token-url", metavar="URL", help="OAuth 2.0 token endpoint")
    cred.add_argument("--oauth-client-id", metavar="ID")
    cred.add_argument("--oauth-client-secret-file", metavar="PATH",
                      help="client secret (client_secret_basic); omit for a public client")
    cred.add_argument("--oauth-refresh-token-file", metavar="PATH",
                      help="refresh token (refresh_token grant); else client_credentials")
    cred.add_argument("--oauth-scope", metavar="S", action="append", dest="oauth_scopes",
                      help="scope to request (repeatable)")
    cred.add_argument("--pass-401", action="store_true", default=None,
                      help="with a credential source, pass the target's 401 to the client "
                      "unchanged instead of a 503 upstream_unauthorized")
    cred.add_argument("--oauth", action="store_true", default=None,
                      help="the sign-in 'mcp-authproxy login NAME' stored for this workload "
                      "(with --store redis://, the one 'login --store' put in the store); "
                      "refreshed and picked up again without a restart")
    health = run.add_argument_group("health probes")
    health.add_argument("--health-interval", type=_number(float), metavar="S",
                        help="seconds between probes, 0 = off (30)")
    health.add_argument("--health-timeout", type=_number(float), metavar="S",
                        help="probe timeout (5)")
    health.add_argument("--health-failures", type=_number(int, minimum=1), metavar="N",
                        help="consecutive failed probes before 'unhealthy' (3)")
    guard = run.add_argument_group("guards and limits")
    guard.add_argument("--allowed-origin", action="append", dest="allowed_origins",
                       metavar="ORIGIN", help="browser Origin accepted besides loopback ones "
                       "(repeatable)")
    guard.add_argument("--allowed-host", action="append", dest="allowed_hosts", metavar="HOST",
                       help="extra Host accepted; turns the Host guard on for any bind "
                       "(always on for loopback) (repeatable)")
    guard.add_argument("--ca-file", metavar="PATH", help="extra CA bundle for an https target")
    guard.add_argument("--max-request-bytes", type=_number(int), metavar="N",
                       help="largest request body forwarded (8388608)")
    guard.add_argument("--response-timeout", type=_number(float), metavar="S",
                       help="longest wait for the target's response headers, 0 = none (300)")
    ops = run.add_argument_group("operations")
    ops.add_argument("--admin-port", type=_number(int), metavar="N",
                     help="serve /healthz /readyz /status /metrics here; 0 = a free port")
    ops.add_argument("--admin-host", metavar="HOST",
                     help="address the admin port binds (127.0.0.1)")
    ops.add_argument("--on-unauthorized-exec", metavar="CMD",
                     help="command run when an unauthorized episode begins (event JSON in "
                     "$MCP_AUTHPROXY_EVENT)")
    ops.add_argument("--log-format", choices=("console", "json"),
                     help="stderr log renderer (console on a TTY, else json)")
    ops.add_argument("--log-level", choices=LOG_LEVELS, help="(info)")

    status = sub.add_parser("status", help="show one workload or all")
    status.add_argument("name", nargs="?", metavar="NAME")
    status.add_argument("--json", action="store_true", help="print the status file contents")
    status.add_argument("--state-dir", metavar="DIR")
    status.add_argument("--store", metavar="URL", help="read the shared record from this "
                        "store (redis:// or rediss://) instead of the status files "
                        "[env MCP_AUTHPROXY_STORE]")

    add_login_parser(sub, _Parser, _number)

    sub.add_parser("demo", help="walk through a revoked and restored token against a local "
                   "MCP server")
    return parser


def config_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> ProxyConfig:
    env = dict(os.environ) if env is None else env
    fields: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key == "command" or value is None:
            continue
        fields[key] = tuple(value) if isinstance(value, list) else value
    for key, var in ENV_FALLBACKS.items():
        if key not in fields and env.get(var):
            raw = env[var]
            if key == "port":
                try:
                    fields[key] = int(raw)
                except ValueError:
                    raise ConfigError(f"--port: {var}={raw!r} is not a whole number") from None
            else:
                fields[key] = raw
    if "target_url" not in fields:
        raise ConfigError("--target-url: is required (or set MCP_AUTHPROXY_TARGET_URL)")
    return ProxyConfig(**fields)


def _print_error(message: str) -> None:
    line = " ".join(str(message).split())
    print(line if line.startswith(PROG) else f"{PROG}: error: {line}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        _print_error(str(exc))
        return 2
    if args.command == "status":
        from .status import show_status

        store = args.store or os.environ.get("MCP_AUTHPROXY_STORE") or "file"
        if store != "file":
            from ..config import parse_store
            from .status import show_shared_status

            try:
                location = parse_store(store)
            except ValueError as exc:
                _print_error(f"--store: {exc}")
                return 2
            return show_shared_status(location, args.name, as_json=args.json)
        state_dir = Path(args.state_dir or os.environ.get("MCP_AUTHPROXY_STATE_DIR") or
                         default_state_dir())
        try:
            return show_status(state_dir, args.name, as_json=args.json)
        except ConfigError as exc:
            _print_error(str(exc))
            return 2
    if args.command == "login":
        return login_main(args, dict(os.environ), _print_error)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo()
    from ..wire.compat import UnsupportedDependency, check

    try:
        check()  # before anything runs: an unsupported aiohttp/httptools is one clear line
    except UnsupportedDependency as exc:
        _print_error(str(exc))
        return 1
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        _print_error(str(exc))
        return 2
    return run_foreground(config)


def run_foreground(config: ProxyConfig) -> int:
    from .. import log

    log.configure(config.log_level, config.log_format)
    logger = log.get_logger()
    try:
        # The optional extra `uvloop`: a faster event loop, used when installed.
        runner: Callable[[Coroutine[Any, Any, int]], int] = importlib.import_module("uvloop").run
    except ImportError:
        runner = asyncio.run
    try:
        return runner(_serve(config))
    except NameInUse as exc:
        _print_error(f"--name: {exc}")
        return 2
    except ConfigError as exc:
        _print_error(str(exc))
        return 2
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        logger.error("failed", error=str(exc), error_type=type(exc).__name__)
        _print_error(f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        log.flush()  # lines still waiting for the end of a loop iteration


async def _serve(config: ProxyConfig) -> int:
    from ..app import AuthProxy
    from ..forwarding.listener import tune_gc_for_serving, tune_malloc_for_serving
    from ..monitor.hooks import exec_callback

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    callbacks = [exec_callback(config.on_unauthorized_exec)] if (
        config.on_unauthorized_exec) else []
    # Someone is watching this terminal: start the sign-in the workload needs.
    interactive = config.oauth and sys.stderr.isatty()
    if interactive:
        callbacks.append(exec_callback(signin_command(config)))
    on_unauthorized = both(*callbacks) if callbacks else None
    step_ups: asyncio.Task[None] | None = None
    try:
        async with AuthProxy(config, on_unauthorized=on_unauthorized) as running:
            # This process exists to serve the proxy, so it may tune its collector.
            tune_gc_for_serving()
            tune_malloc_for_serving()
            sys.stdout.write(running.url + "\n")
            sys.stdout.flush()
            if interactive:
                step_ups = asyncio.create_task(start_step_ups(
                    lambda: running.status, signin_command(config)))
            await stop.wait()
    finally:
        if step_ups is not None:
            step_ups.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def main_entry() -> NoReturn:
    sys.exit(main())


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False)
