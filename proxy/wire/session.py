"""The `aiohttp.ClientSession` the rest of the proxy talks to the target with: health
probes, and anything else that is not a client's forwarded request.

Transparent like the pool: it adds no header of its own, never decompresses, keeps no
cookies, never follows a redirect by itself and never reads proxy settings from the
environment; it verifies the target's certificate with the same TLS context.
"""

from __future__ import annotations

import aiohttp

from ..config import ProxyConfig
from ..tls import client_context
from .limits import MAX_HEADER_LINE

# Headers aiohttp would otherwise invent; a client that sent them still has them forwarded.
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def make_session(config: ProxyConfig) -> aiohttp.ClientSession:
    """The shared session for probes; must be created inside the running loop.

    Transparent: it adds no headers of its own, never decompresses, never stores cookies
    and never follows redirects by itself.
    """
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=0,
        keepalive_timeout=config.upstream_idle_timeout,
        ssl=client_context(config.ca_file),
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=SKIP_AUTO_HEADERS,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=None),
        trust_env=False,
        raise_for_status=False,
        max_line_size=MAX_HEADER_LINE,
        max_field_size=MAX_HEADER_LINE,
    )
