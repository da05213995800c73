"""The exception tree of mcp-authproxy.

    ProxyError
    ├── ConfigError (ValueError)        bad flag or configuration -> exit 2
    │   └── UnsafePath                  a state/credentials path others could change
    ├── StateError                      status store problems
    │   └── NameInUse                   another live process owns the workload name
    ├── StoreKeyMismatch                a shared store's tokens are not this key's or
    │                                   this workload's -> that replica `error`
    ├── SignInError                     `login` failed at a named step -> exit 1
    └── CredentialUnavailable           no credential at hand -> 503 + Retry-After
        ├── CredentialInvalid           permanent: the source must heal first
        └── CredentialRetrying          transient: a refresh is failing or in flight

Foreign errors (the upstream pool's, aiohttp.ClientError, OSError) are translated at one
boundary each: the forwarding edge (502/504) and the store's I/O boundary. Nothing here carries a
credential in its message.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(ProxyError, ValueError):
    """A bad option. The message names the option (flag or field) and fits on one line."""


class UnsafePath(ConfigError):
    """A directory or file others could write or redirect (`safe_fs`); names the flag."""


class StateError(ProxyError):
    """The status store could not be read or written."""


class NameInUse(StateError):
    """A second live process tried to run a workload name that is taken."""

    def __init__(self, name: str, pid: int) -> None:
        super().__init__(f"workload {name!r} is already run by live process {pid}")
        self.name = name
        self.pid = pid


class StoreKeyMismatch(ProxyError):
    """Tokens in a shared store do not decrypt with our key, or belong elsewhere."""


class SignInError(ProxyError):
    """A sign-in step failed. `str()` is the one line a person reads: the step, what
    went wrong and the server's `error` code when it sent one; never a credential."""

    def __init__(self, step: str, message: str, code: str | None = None) -> None:
        detail = f" ({code})" if code else ""
        super().__init__(f"{step}: {message}{detail}")
        self.step = step
        self.code = code


class CredentialUnavailable(ProxyError):
    """No credential can be injected right now; the request gets 503 + Retry-After."""

    def __init__(self, reason: str, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class CredentialInvalid(CredentialUnavailable):
    """The source is invalid (missing file, refused grant); only a change heals it."""


class CredentialRetrying(CredentialUnavailable):
    """Refreshing fails transiently or is still in flight; it may succeed on its own."""
