"""`mcp-authproxy login NAME | --target-url URL`: sign a workload in and store it.

Argparse for the subcommand, the target and scopes it works out (the stored sign-in,
the status record, a step-up asked for by the target), then discovery and the sign-in
itself (`credentials.discovery`, `credentials.login`), stored by
`credentials.signin_store` for `run --oauth`, which picks it up without a restart; with
`--store redis://` it goes into the shared store instead, encrypted
(`credentials.token_store`), for every replica.

Stdout gets exactly one line, `<issuer> <workload> <granted scopes>`; the authorization
URL and the device code go to stderr. Exit 0 signed in, 1 a step failed (one line naming
it and the server's `error` code), 2 bad flags. Nothing printed carries a secret.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from yarl import URL

from ..config import NAME_RE, ProxyConfig, default_name, default_state_dir
from ..credentials.discovery import discover
from ..credentials.files import read_secret_file
from ..credentials.login import LoginOptions, SignIn
from ..credentials.signin_store import (
    CredentialsFileRefused,
    StoredSignIn,
    load_signin,
    save_signin,
)
from ..errors import ConfigError, SignInError, StateError, StoreKeyMismatch
from ..monitor.auth import UnauthorizedCallback, UnauthorizedEvent
from ..status.model import ConditionType, WorkloadRecord
from ..tls import client_context

REQUEST_TIMEOUT = 30.0  # each discovery, registration and token request
# The Authorized condition's message when the target asked for more scope
# (`monitor.auth.scope_message`): "target answered 403 insufficient_scope; it asks for
# scope 'a b'".
_STEP_UP = re.compile(r"insufficient_scope; it asks for scope '([^']*)'")


def add_login_parser(sub: Any, parser_class: type[argparse.ArgumentParser],
                     number: Any) -> None:
    """The `login` subcommand on `sub` (the `add_subparsers` of the main parser)."""
    login = sub.add_parser(
        "login", help="sign a workload in to its target's authorization server",
        description="Discover the target's authorization server (RFC 9728, RFC 8414), "
        "register a client if needed (RFC 7591), sign in with a browser (authorization "
        "code + PKCE, loopback redirect) or a device code (RFC 8628), and store the "
        "sign-in for 'run --oauth' (with --store, in the store every replica shares). A running "
        "'run --oauth' picks it up at once.")
    login.add_argument("name", nargs="?", metavar="NAME",
                       help="the workload; its target comes from its stored sign-in or "
                       "status record")
    login.add_argument("--target-url", metavar="URL", help="the MCP endpoint to sign in to")
    login.add_argument("--name", dest="name_flag", metavar="NAME",
                       help="workload name with --target-url (the target's host name)")
    login.add_argument("--state-dir", metavar="DIR", help="where sign-ins and status files "
                       "live [env MCP_AUTHPROXY_STATE_DIR]")
    login.add_argument("--scope", action="append", dest="scopes", metavar="S",
                       help="scope to ask for (repeatable); default: the 401's scope, else "
                       "the resource metadata's scopes_supported")
    login.add_argument("--client-id", metavar="ID", help="a client registered beforehand")
    login.add_argument("--client-secret-file", metavar="PATH",
                       help="that client's secret (a confidential client)")
    login.add_argument("--client-metadata-url", metavar="URL",
                       help="https URL of this client's metadata document, used as client_id "
                       "where the server supports Client ID Metadata Documents")
    login.add_argument("--callback-port", type=number(int, minimum=1), metavar="N",
                       help="fixed loopback port for the redirect (a free port)")
    login.add_argument("--no-browser", action="store_true",
                       help="print the authorization URL instead of opening a browser "
                       "($BROWSER is honoured otherwise)")
    login.add_argument("--device", action="store_true",
                       help="use the device authorization grant (RFC 8628)")
    login.add_argument("--ca-file", metavar="PATH", help="extra CA bundle")
    login.add_argument("--timeout", type=number(float, minimum=1), metavar="S", default=300.0,
                       help="longest wait for the person to finish (300)")
    login.add_argument("--store", metavar="URL",
                       help="redis:// store the workload's replicas share: the sign-in goes "
                       "there (encrypted), once for every 'run --oauth --store' replica")
    login.add_argument("--store-key-file", metavar="PATH",
                       help="the Fernet key the replicas use (required with --store)")


def login_options(args: argparse.Namespace, env: dict[str, str]) -> LoginOptions:
    """Flags -> `LoginOptions`; `ConfigError` naming the flag for bad input (exit 2)."""
    store, key_file = _store_flags(args)
    state_dir = Path(args.state_dir or env.get("MCP_AUTHPROXY_STATE_DIR") or
                     default_state_dir())
    if args.name and args.name_flag and args.name != args.name_flag:
        raise ConfigError("--name: give the workload once, as NAME or --name")
    name = args.name or args.name_flag
    target = args.target_url
    stored_scope: tuple[str, ...] = ()
    if name is not None and not NAME_RE.fullmatch(name):
        raise ConfigError(f"NAME: {name!r} is not a workload name ([A-Za-z0-9._-]{{1,64}})")
    if target is None:
        if name is None:
            raise ConfigError("--target-url: give a workload NAME or --target-url")
        if store is not None:
            assert key_file is not None
            target, stored_scope = asyncio.run(_shared_target(store, key_file, name))
        else:
            target, stored_scope = _known_target(state_dir, name)
    else:
        try:
            url = URL(target)
        except ValueError:
            raise ConfigError(f"--target-url: {target!r} is not a URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError("--target-url: must be an http:// or https:// URL")
        if name is None:
            name = default_name(url)
        with _refused_as_config():
            signin = load_signin(state_dir, name)
        if signin is not None and URL(signin.target_url) == url:
            stored_scope = signin.scope
    assert name is not None
    if args.client_metadata_url is not None:
        metadata_url = URL(args.client_metadata_url)
        if metadata_url.scheme != "https" or not metadata_url.host:
            raise ConfigError("--client-metadata-url: must be an https:// URL")
    scopes = tuple(args.scopes or ())
    if not scopes and stored_scope:
        # Sign in again with what was granted, plus whatever the target asked for since.
        scopes = _merge(stored_scope, _step_up_scopes(state_dir, name))
    secret = None
    if args.client_secret_file is not None:
        if args.client_id is None:
            raise ConfigError("--client-secret-file: needs --client-id")
        read = read_secret_file(Path(args.client_secret_file), "client secret file",
                                spaces=True)
        if read.text is None:
            raise ConfigError(f"--client-secret-file: {read.message}")
        secret = read.text
    return LoginOptions(
        name=name, target_url=target, state_dir=state_dir, scopes=scopes,
        client_id=args.client_id, client_secret=secret,
        client_metadata_url=args.client_metadata_url, callback_port=args.callback_port,
        no_browser=args.no_browser, device=args.device, timeout=args.timeout,
        store=store, store_key_file=key_file)


def _store_flags(args: argparse.Namespace) -> tuple[str | None, Path | None]:
    """`--store` and `--store-key-file`, checked as `run` checks them."""
    if args.store is None or args.store == "file":
        if args.store_key_file is not None:
            raise ConfigError("--store-key-file: needs --store redis://...")
        return None, None
    from ..config import check_key_file, parse_store

    try:
        parse_store(args.store)
    except ValueError as exc:
        raise ConfigError(f"--store: {exc}") from None
    if args.store_key_file is None:
        raise ConfigError("--store-key-file: is required with --store redis:// (the "
                          "sign-in kept in the store is encrypted with it)")
    try:
        check_key_file(Path(args.store_key_file))
    except ValueError as exc:
        raise ConfigError(f"--store-key-file: {exc}") from None
    return args.store, Path(args.store_key_file)


@contextlib.contextmanager
def _refused_as_config() -> Iterator[None]:
    try:
        yield
    except CredentialsFileRefused as exc:
        raise ConfigError(f"NAME: {exc}") from None


def _known_target(state_dir: Path, name: str) -> tuple[str, tuple[str, ...]]:
    """A workload's target URL: its stored sign-in's, else its status record's."""
    with _refused_as_config():
        signin = load_signin(state_dir, name)
    if signin is not None:
        return signin.target_url, signin.scope
    from ..status.store import FileStore

    record = FileStore(state_dir, name).read_sync()
    if record is None or not record.target_url:
        raise ConfigError(f"NAME: no workload {name!r} is known in {state_dir}; "
                          "give --target-url")
    if URL(record.target_url).query_string:  # redacted in the record: not usable
        raise ConfigError(f"NAME: the status record of {name!r} holds a redacted query; "
                          "give --target-url")
    return record.target_url, ()


async def _shared_target(store: str, key_file: Path, name: str
                         ) -> tuple[str, tuple[str, ...]]:
    """With `--store`: the target of the workload's shared record, and the scope of the
    sign-in already in the store (when it decrypts with the key)."""
    from ..config import parse_store
    from ..credentials.token_store import RedisTokenStore, read_key
    from ..status.redis import connect, read_shared

    location = parse_store(store)
    try:
        records = await read_shared(location, name)
    except StateError as exc:
        raise ConfigError(f"--store: {exc}") from None
    if not records or not records[0].target_url or URL(records[0].target_url).query_string:
        raise ConfigError(f"NAME: no usable target for {name!r} in {location.display}; "
                          "give --target-url")
    target = records[0].target_url
    client = connect(location)
    try:
        signin = await RedisTokenStore(
            client, workload=name, origin=str(URL(target).origin()), issuer=None,
            key=read_key(key_file), lease=REQUEST_TIMEOUT, display=location.display,
        ).load_signin()
    except (StateError, StoreKeyMismatch):
        signin = None  # signing in again is the cure: go on without the old scope
    finally:
        await client.aclose()
    scope = signin.get("scope") if signin is not None else None
    return target, tuple(scope.split()) if isinstance(scope, str) else ()


def _step_up_scopes(state_dir: Path, name: str) -> tuple[str, ...]:
    from ..status.store import FileStore

    try:
        record = FileStore(state_dir, name).read_sync()
    except Exception:  # a status problem must not stop a sign-in
        return ()
    if record is None:
        return ()
    for condition in record.conditions:
        if condition.type == "Authorized" and not condition.status:
            found = _STEP_UP.search(condition.message or "")
            if found:
                return tuple(found.group(1).split())
    return ()


def _merge(first: tuple[str, ...], second: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*first, *second)))


async def run_login(options: LoginOptions, *, ca_file: str | None, stderr: TextIO) -> str:
    """Every step; returns the stdout line. Raises `SignInError` naming the failed step."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(ssl=client_context(ca_file), limit=4)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     trust_env=False) as session:
        found = await discover(session, options.target_url)
        signin = await SignIn(session, found, options, stderr=stderr).run()
    if options.store is not None:
        await save_to_store(options, signin)
        return f"{signin.issuer} {options.name} {' '.join(signin.scope)}".rstrip()
    try:
        save_signin(options.state_dir, options.name, signin)
    except (CredentialsFileRefused, OSError) as exc:
        raise SignInError("storing the sign-in", str(exc)) from None
    return f"{signin.issuer} {options.name} {' '.join(signin.scope)}".rstrip()


async def save_to_store(options: LoginOptions, signin: StoredSignIn) -> None:
    """`login --store`: the sign-in into the shared store, where every replica reads it."""
    from ..config import parse_store
    from ..credentials.token_store import RedisTokenStore, read_key
    from ..status.redis import connect

    assert options.store is not None and options.store_key_file is not None
    location = parse_store(options.store)
    client = connect(location)
    try:
        store = RedisTokenStore(
            client, workload=options.name, origin=str(URL(signin.target_url).origin()),
            issuer=signin.issuer, key=read_key(options.store_key_file), lease=REQUEST_TIMEOUT,
            display=location.display)
        await store.save_signin(signin.to_json())
    except StateError as exc:
        raise SignInError("storing the sign-in", str(exc)) from None
    finally:
        await client.aclose()


def login_main(args: argparse.Namespace, env: dict[str, str],
               print_error: Any) -> int:
    try:
        options = login_options(args, env)
    except ConfigError as exc:
        print_error(str(exc))
        return 2
    from .. import log

    # Logs go to stderr, and only warnings: what a person reads here are the prompts.
    log.configure("warning", None)
    try:
        line = asyncio.run(run_login(options, ca_file=args.ca_file, stderr=sys.stderr))
    except SignInError as exc:
        print_error(f"login: {exc}")
        return 1
    except KeyboardInterrupt:
        print_error("login: interrupted")
        return 1
    finally:
        log.flush()
    print(line, flush=True)
    return 0


def signin_command(config: ProxyConfig) -> str:
    """The `login` command line an interactive `run --oauth` starts for its workload."""
    argv = [sys.executable, "-m", "proxy", "login", config.workload,
            "--state-dir", str(config.state_path)]
    if config.ca_file is not None:
        argv += ["--ca-file", str(config.ca_file)]
    return shlex.join(argv)


def both(*callbacks: UnauthorizedCallback) -> UnauthorizedCallback:
    """One callback running each of `callbacks` in turn (each is already failure-safe)."""
    if len(callbacks) == 1:
        return callbacks[0]

    async def run(event: UnauthorizedEvent) -> None:
        for callback in callbacks:
            result = callback(event)
            if inspect.isawaitable(result):
                await result

    return run


STEP_UP_CHECK = 1.0  # seconds between looks at the Authorized condition (in memory)


async def start_step_ups(workload_record: Callable[[], WorkloadRecord], command: str,
                         interval: float = STEP_UP_CHECK) -> None:
    """Interactive `run --oauth`: when the target asks for more scope (Authorized False,
    InsufficientScope), run `login NAME` once for that turn, which asks for the stored
    scopes plus those. Runs until cancelled; a failing login is logged, never fatal."""
    from .. import log

    handled = None
    while True:
        await asyncio.sleep(interval)
        condition = workload_record().condition(ConditionType.AUTHORIZED)
        if condition is None or condition.status or condition.reason != "InsufficientScope":
            continue
        if condition.last_transition_time == handled:
            continue
        handled = condition.last_transition_time
        log.get_logger().info("step_up_sign_in", message=condition.message)
        try:
            process = await asyncio.create_subprocess_exec(
                *shlex.split(command), stdin=asyncio.subprocess.DEVNULL, stdout=2, stderr=2)
        except OSError as exc:
            log.get_logger().warning("step_up_sign_in_failed", error=exc.strerror or str(exc))
            continue
        try:
            await process.wait()
        except asyncio.CancelledError:
            process.kill()  # the proxy stops: so does the sign-in it started
            raise
