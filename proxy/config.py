"""`ProxyConfig`: every option of the proxy, validated once, frozen afterwards.

Fields map one-to-one to the CLI flags of `mcp-authproxy run` (snake_case), plus the
tunables without a flag, in float seconds, so tests can shorten them. Construction
raises `ConfigError` (a `ValueError`) whose one-line message names the option; it
never echoes a credential or a query value of the target URL.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from yarl import URL

from .errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")

CredentialKind = Literal["none", "bearer_file", "bearer_env", "oauth", "signin"]


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _fail(field_name: str, problem: str) -> ConfigError:
    return ConfigError(f"{_flag(field_name)}: {problem}")


def default_state_dir() -> Path:
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "mcp-authproxy"


def default_name(target: URL) -> str:
    host = target.raw_host or "workload"
    return re.sub(r"[^A-Za-z0-9._-]", "-", host)[:64]


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_origin(value: str) -> str:
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.raw_host or url.raw_path not in ("", "/"):
        raise ValueError(value)
    if url.query_string or url.fragment:
        raise ValueError(value)
    return str(url.origin()).lower()


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    """Everything `mcp-authproxy run` can be told, validated in `__post_init__`."""

    target_url: str
    host: str = "127.0.0.1"
    port: int = 0
    name: str | None = None
    state_dir: str | Path | None = None
    bearer_token_file: str | Path | None = None
    bearer_token_env: str | None = None
    oauth_token_url: str | None = None
    oauth_client_id: str | None = None
    oauth_client_secret_file: str | Path | None = None
    oauth_refresh_token_file: str | Path | None = None
    oauth_scopes: tuple[str, ...] = ()
    oauth: bool = False
    pass_401: bool = False
    health_interval: float = 30.0
    health_timeout: float = 5.0
    health_failures: int = 3
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    ca_file: str | Path | None = None
    max_request_bytes: int = 8 * 1024 * 1024
    response_timeout: float = 300.0
    admin_port: int | None = None
    admin_host: str = "127.0.0.1"
    on_unauthorized_exec: str | None = None
    log_format: Literal["console", "json"] | None = None
    log_level: str = "info"
    # Tunables without a flag (float seconds / bytes / counts).
    header_timeout: float = 10.0
    credential_wait: float = 10.0
    auth_retrying_after: float = 60.0
    auth_give_up_after: float = 24 * 3600.0
    auth_slow_retry: float = 300.0
    replay_limit: int = 1024 * 1024
    drain_timeout: float = 10.0
    max_connections: int = 4096
    keepalive_timeout: float = 75.0
    upstream_idle_timeout: float = 30.0
    # Filled in by __post_init__; not constructor arguments.
    target: URL = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        target = self._validate_target()
        set_(self, "target", target)
        if self.name is None:
            set_(self, "name", default_name(target))
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise _fail("name", "must match [A-Za-z0-9._-]{1,64}")
        set_(self, "state_dir", Path(self.state_dir) if self.state_dir else default_state_dir())
        for path_field in (
            "bearer_token_file",
            "oauth_client_secret_file",
            "oauth_refresh_token_file",
            "ca_file",
        ):
            value = getattr(self, path_field)
            if value is not None:
                if str(value) == "":
                    raise _fail(path_field, "must not be empty")
                set_(self, path_field, Path(value))
        for tuple_field in ("oauth_scopes", "allowed_origins", "allowed_hosts"):
            value = getattr(self, tuple_field)
            if isinstance(value, str):
                raise _fail(tuple_field, "must be a sequence of strings, not one string")
            set_(self, tuple_field, tuple(value))
        self._validate_numbers()
        self._validate_credentials()
        self._validate_network()
        if self.log_format not in (None, "console", "json"):
            raise _fail("log_format", "must be 'console' or 'json'")
        if str(self.log_level).lower() not in LOG_LEVELS:
            raise _fail("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
        set_(self, "log_level", str(self.log_level).lower())
        if self.on_unauthorized_exec is not None:
            import shlex

            try:
                argv = shlex.split(self.on_unauthorized_exec)
            except ValueError as exc:
                raise _fail("on_unauthorized_exec", f"cannot be split: {exc}") from None
            if not argv:
                raise _fail("on_unauthorized_exec", "must name a command")

    def _validate_target(self) -> URL:
        if not isinstance(self.target_url, str) or not self.target_url:
            raise _fail("target_url", "is required")
        try:
            target = URL(self.target_url)
        except (ValueError, TypeError):
            raise _fail("target_url", "is not a valid URL") from None
        if target.scheme not in ("http", "https"):
            raise _fail("target_url", "must start with http:// or https://")
        if not target.raw_host:
            raise _fail("target_url", "must name a host")
        if target.user or target.password:
            raise _fail("target_url", "must not carry user:password (use a credential flag)")
        if target.fragment:
            raise _fail("target_url", "must not have a #fragment")
        try:
            target.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise _fail("target_url", "has an invalid port") from None
        if target.raw_path == "":
            target = target.with_path("/")
        return target

    def _validate_numbers(self) -> None:
        def number(field_name: str, *, minimum: float, integer: bool = False,
                   strict: bool = False, maximum: float | None = None) -> None:
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _fail(field_name, "must be a number")
            if integer and not float(value).is_integer():
                raise _fail(field_name, "must be a whole number")
            if value != value or value in (float("inf"), float("-inf")):
                raise _fail(field_name, "must be a finite number")
            if value < minimum or (strict and value == minimum):
                relation = "greater than" if strict else "at least"
                raise _fail(field_name, f"must be {relation} {minimum:g}")
            if maximum is not None and value > maximum:
                raise _fail(field_name, f"must be at most {maximum:g}")

        number("port", minimum=0, integer=True, maximum=65535)
        if self.admin_port is not None:
            number("admin_port", minimum=0, integer=True, maximum=65535)
        number("health_interval", minimum=0)
        number("health_timeout", minimum=0, strict=True)
        number("health_failures", minimum=1, integer=True)
        number("max_request_bytes", minimum=0, integer=True)
        number("response_timeout", minimum=0)
        number("header_timeout", minimum=0, strict=True)
        number("credential_wait", minimum=0, strict=True)
        number("auth_retrying_after", minimum=0)
        number("auth_give_up_after", minimum=0)
        number("auth_slow_retry", minimum=0, strict=True)
        number("replay_limit", minimum=0, integer=True)
        number("drain_timeout", minimum=0)
        number("max_connections", minimum=1, integer=True)
        number("keepalive_timeout", minimum=0, strict=True)
        number("upstream_idle_timeout", minimum=0, strict=True)

    def _validate_credentials(self) -> None:
        oauth_fields = ("oauth_token_url", "oauth_client_id", "oauth_client_secret_file",
                        "oauth_refresh_token_file")
        uses_oauth = any(getattr(self, f) is not None for f in oauth_fields) or bool(
            self.oauth_scopes
        )
        chosen = [
            flag for flag, used in (
                ("--bearer-token-file", self.bearer_token_file is not None),
                ("--bearer-token-env", self.bearer_token_env is not None),
                ("--oauth-token-url", uses_oauth),
                ("--oauth", self.oauth is True),
            ) if used
        ]
        if len(chosen) > 1:
            raise ConfigError(
                f"{chosen[1]}: only one credential source may be given (also got {chosen[0]})"
            )
        for flag_field in ("oauth", "pass_401"):
            if not isinstance(getattr(self, flag_field), bool):
                raise _fail(flag_field, "must be True or False")
        if self.bearer_token_env is not None:
            var = self.bearer_token_env
            if not var or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
                raise _fail("bearer_token_env", "must name an environment variable")
            if not os.environ.get(var, "").strip():
                raise _fail("bearer_token_env", f"environment variable {var} is unset or empty")
        if uses_oauth:
            if not self.oauth_token_url:
                raise _fail("oauth_token_url", "is required with the other --oauth-* flags")
            token_url = URL(self.oauth_token_url)
            if token_url.scheme not in ("http", "https") or not token_url.raw_host:
                raise _fail("oauth_token_url", "must be an http:// or https:// URL")
            if not self.oauth_client_id:
                raise _fail("oauth_client_id", "is required with --oauth-token-url")
            for scope in self.oauth_scopes:
                if not scope or any(c.isspace() for c in scope):
                    raise _fail("oauth_scopes", "each scope must be one non-empty word")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise _fail("ca_file", f"no such file: {self.ca_file}")

    def _validate_network(self) -> None:
        if not self.host:
            raise _fail("host", "must not be empty")
        if not isinstance(self.admin_host, str) or not self.admin_host:
            raise _fail("admin_host", "must not be empty")
        origins = []
        for origin in self.allowed_origins:
            try:
                origins.append(_check_origin(origin))
            except ValueError:
                raise _fail(
                    "allowed_origin", f"{origin!r} is not an origin like https://app.example"
                ) from None
        object.__setattr__(self, "allowed_origins", tuple(origins))
        hosts = []
        for host in self.allowed_hosts:
            if not host or any(c in host for c in "/ @?#"):
                raise _fail("allowed_host", f"{host!r} is not a host name")
            hosts.append(host.lower())
        object.__setattr__(self, "allowed_hosts", tuple(hosts))

    # Derived views -----------------------------------------------------------------

    @property
    def workload(self) -> str:
        assert self.name is not None
        return self.name

    @property
    def state_path(self) -> Path:
        assert isinstance(self.state_dir, Path)
        return self.state_dir

    @property
    def mcp_path(self) -> str:
        """The target's MCP path: the only path whose answers can prove a credential."""
        return self.target.raw_path or "/"

    @property
    def credential_kind(self) -> CredentialKind:
        if self.bearer_token_file is not None:
            return "bearer_file"
        if self.bearer_token_env is not None:
            return "bearer_env"
        if self.oauth_token_url is not None:
            return "oauth"
        if self.oauth:
            return "signin"
        return "none"

    @property
    def binds_loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def checks_host(self) -> bool:
        """The DNS-rebinding `Host` guard is on: always on a loopback bind, and on any
        other bind as soon as one `--allowed-host` is given."""
        return self.binds_loopback or bool(self.allowed_hosts)

    @property
    def admin_checks_host(self) -> bool:
        """The same guard for the admin port, which binds `admin_host`."""
        return is_loopback_host(self.admin_host) or bool(self.allowed_hosts)
