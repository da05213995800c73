"""Outgoing credentials: one interface (`base.CredentialSource`) for every source the
proxy can inject from, and the factory that picks one from a `ProxyConfig`.

Sources: `bearer.FileBearerSource`, `bearer.EnvBearerSource`, `oauth.OAuthSource`,
`stored.StoredSignInSource` (the sign-in `mcp-authproxy login` stored).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .base import Credential, CredentialReporter, CredentialSource, RefreshListener
from .bearer import EnvBearerSource, FileBearerSource
from .oauth import OAuthSource
from .stored import StoredSignInSource
from .token_store import RedisTokenStore, TokenStore

if TYPE_CHECKING:
    import aiohttp

    from ..config import ProxyConfig

__all__ = [
    "Credential",
    "CredentialReporter",
    "CredentialSource",
    "EnvBearerSource",
    "FileBearerSource",
    "OAuthSource",
    "RefreshListener",
    "StoredSignInSource",
    "TokenStore",
    "build_credential_source",
]


def build_credential_source(
    config: ProxyConfig,
    *,
    session_factory: Callable[[], aiohttp.ClientSession] | None = None,
    refresh_listener: RefreshListener | None = None,
    token_store: TokenStore | None = None,
) -> CredentialSource | None:
    """The source the configuration asks for; None when no credential is configured.

    `refresh_listener` hears how each token refresh ended (sources that refresh only);
    `token_store` is where replicas sharing a store keep an OAuth source's tokens.
    """
    kind = config.credential_kind
    if kind == "bearer_file":
        assert config.bearer_token_file is not None
        return FileBearerSource(config.bearer_token_file)
    if kind == "bearer_env":
        assert config.bearer_token_env is not None
        return EnvBearerSource(config.bearer_token_env)
    if kind == "oauth":
        source = OAuthSource(config, session_factory=session_factory,
                             token_store=token_store)
        source.refresh_listener = refresh_listener
        return source
    if kind == "signin":
        # With a shared store the sign-in lives there (`login --store`), else in its file.
        source = StoredSignInSource(config, session_factory=session_factory,
                                    signin_store=token_store if isinstance(
                                        token_store, RedisTokenStore) else None)
        source.refresh_listener = refresh_listener
        return source
    return None
