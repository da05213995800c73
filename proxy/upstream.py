"""The proxy's one upstream `ClientSession` and the TLS context it verifies targets with.

The session is transparent: it adds no headers of its own (no Accept, Accept-Encoding,
User-Agent or Content-Type), never decompresses, never stores cookies between clients
and never follows redirects by itself (the forwarding handler decides, so a credential
never leaves the target's origin). It must never disable certificate verification.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
from aiohttp import hdrs

from .config import ProxyConfig

# Headers aiohttp would otherwise invent; a client that sent them still has them forwarded.
SKIP_AUTO_HEADERS = (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE)


def make_ssl_context(ca_file: str | Path | None = None) -> ssl.SSLContext:
    """System CAs plus `ca_file` (an extra bundle, e.g. a private CA), hostname-checked."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def make_session(config: ProxyConfig) -> aiohttp.ClientSession:
    """The shared upstream session; must be created inside the running loop."""
    connector = aiohttp.TCPConnector(
        # A held SSE stream keeps its connection for its lifetime: never queue the 101st.
        limit=0,
        limit_per_host=0,
        keepalive_timeout=config.upstream_idle_timeout,
        ssl=make_ssl_context(config.ca_file),
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=SKIP_AUTO_HEADERS,
        cookie_jar=aiohttp.DummyCookieJar(),
        # Time limits are the handler's: response_timeout for headers, none for a stream.
        timeout=aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=None),
        trust_env=False,
        raise_for_status=False,
        # The target's header sizes are the client's business, not ours to cap at 8 KiB.
        max_line_size=65536,
        max_field_size=65536,
    )
