"""The forwarding path's pure helpers: which headers go where, URLs, guards, redirects.

No I/O and no state: each function takes what it needs and returns what to send, so
each rule (RFC 9110 hop-by-hop fields, the contract's forwarded headers, the Origin and
Host guards, same-origin redirects) can be tested without a socket. Nothing here may
add a credential to anything bound for another origin than the target's.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from urllib.parse import unquote

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..config import is_loopback_host
from ..credentials.challenge import BearerError
from ..wire.server import error_body

# RFC 9110 §7.6.1 connection-specific fields, plus the legacy ones proxies still see.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization",
})
# Never forwarded to the target: hop-by-hop, ours to set, or handled by the proxy itself.
_DROP_REQUEST = HOP_BY_HOP | {"host", "forwarded", "expect"}
_X_FORWARDED = "x-forwarded-"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# The `Allow` of the proxy's 405 to TRACE and CONNECT (RFC 9110 §15.5.6 requires one).
ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """Header names the sender marked hop-by-hop in its `Connection` header(s)."""
    values = headers.getall(hdrs.CONNECTION, ())
    if not values:
        return frozenset()
    return frozenset(
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    )


# What each header name (as spelled on the wire) means for forwarding, remembered: the
# same dozen names come with every request. Bounded, as clients choose the names.
_DROP, _KEEP, _AUTH = 0, 1, 2
_REQUEST_NAMES: dict[str, int] = {}
_RESPONSE_NAMES: dict[str, bool] = {}
_NAMES_KEPT = 512


def _request_kind(name: str) -> int:
    kind = _REQUEST_NAMES.get(name)
    if kind is None:
        low = name.lower()
        if low in _DROP_REQUEST or low.startswith(_X_FORWARDED):
            kind = _DROP
        else:
            kind = _AUTH if low == "authorization" else _KEEP
        if len(_REQUEST_NAMES) < _NAMES_KEPT:
            _REQUEST_NAMES[name] = kind
    return kind


def request_headers(
    incoming: CIMultiDictProxy[str] | CIMultiDict[str],
    *,
    client_ip: str,
    target_scheme: str,
    authorization: str | None,
    client_authorization: bool = True,
) -> CIMultiDict[str]:
    """The headers to send to the target for a client's request.

    `authorization` is the injected credential: when given, the client's own
    `Authorization` is dropped (no token passthrough); when None it passes as is,
    unless `client_authorization` is False (a source is configured, but this path is
    not one the credential goes to).
    """
    named = connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        kind = _request_kind(name)
        if kind == _DROP or (named and name.lower() in named):
            continue
        if kind == _AUTH and (authorization is not None or not client_authorization):
            continue
        out.add(name, value)
    if authorization is not None:
        out[hdrs.AUTHORIZATION] = authorization
    out[hdrs.X_FORWARDED_FOR] = client_ip
    out[hdrs.X_FORWARDED_PROTO] = target_scheme
    return out


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The target's response headers minus hop-by-hop ones, in order, repeats kept."""
    named = connection_tokens(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        hop = _RESPONSE_NAMES.get(name)
        if hop is None:
            hop = name.lower() in HOP_BY_HOP
            if len(_RESPONSE_NAMES) < _NAMES_KEPT:
                _RESPONSE_NAMES[name] = hop
        if hop or (named and name.lower() in named):
            continue
        out.add(name, value)
    return out


def response_fields(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`response_headers` for a head's fields as a list (no multidict made)."""
    named: frozenset[str] = frozenset()
    out = []
    for name, value in fields:
        hop = _RESPONSE_NAMES.get(name)
        if hop is None:
            hop = name.lower() in HOP_BY_HOP
            if len(_RESPONSE_NAMES) < _NAMES_KEPT:
                _RESPONSE_NAMES[name] = hop
        if hop:
            if name.lower() == "connection":
                named = named | {token.strip().lower() for token in value.split(",")}
            continue
        out.append((name, value))
    if named:
        out = [(name, value) for name, value in out if name.lower() not in named]
    return out


def is_mcp_path(path: str, mcp_path: str, endpoints: Collection[str] = ()) -> bool:
    """Is `path` (raw, as sent) an MCP path: the target path, one below it, or a legacy
    `endpoint` path the target announced? Only there is the credential injected and do
    the target's answers speak about it (contract, Forwarding).

    A path with a dot segment (`/mcp/../admin`, also percent-encoded or with a
    backslash) is never one: the target may resolve it to somewhere else entirely.
    """
    if path in endpoints:
        return True
    if path != mcp_path:
        base = mcp_path.rstrip("/") + "/"
        if not path.startswith(base):
            return False
    if "." in path or "%" in path or "\\" in path:
        decoded = path
        for _ in range(3):  # servers that decode twice exist; more layers are an attack
            before, decoded = decoded, unquote(decoded)
            if decoded == before:
                break
        else:
            return False
        segments = decoded.replace("\\", "/").split("/")
        if "." in segments or ".." in segments:
            return False
    return True


def split_raw_path(raw: str) -> tuple[str, str]:
    """(path, query) of a request target, as sent; absolute-form targets are reduced."""
    if not raw.startswith("/"):
        try:
            raw = URL(raw, encoded=True).raw_path_qs
        except ValueError:
            raw = "/"
    path, _, query = raw.partition("?")
    return path, query


def merge_query(query: str, target: URL) -> str:
    """The request's query plus the target URL's parameters it does not set itself."""
    extra = target.raw_query_string
    if not extra:
        return query
    if not query:
        return extra
    have = {part.partition("=")[0] for part in query.split("&")}
    added = [part for part in extra.split("&") if part.partition("=")[0] not in have]
    return "&".join([query, *added]) if added else query


def path_with_query(path: str, query: str) -> str:
    """The request target sent upstream: path and query as received (no empty "?")."""
    return f"{path}?{query}" if query else path


def upstream_url(origin: str, path_qs: str) -> URL:
    """The target URL for a request: byte-for-byte path and query on the target origin."""
    return URL(f"{origin}{path_qs}", encoded=True)


def is_loopback_origin(origin: str) -> bool:
    try:
        url = URL(origin)
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.raw_host) and is_loopback_host(
        url.raw_host or ""
    )


def origin_allowed(origin: str, allowed: Sequence[str]) -> bool:
    """A browser `Origin` we accept: any loopback origin, or one the user allowed."""
    return is_loopback_origin(origin) or origin.lower().rstrip("/") in allowed


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """DNS-rebinding guard: a `Host` naming loopback or one of `allowed` (with or w/o port)."""
    host = host.strip().lower()
    if host in allowed:
        return True
    if host.startswith("["):
        name = host[: host.find("]") + 1] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return is_loopback_host(name) or name in allowed


def redirect_target(status: int, location: str | None, current: URL, origin: URL) -> URL | None:
    """Where to follow a redirect, or None when it must go to the client unchanged.

    Only redirects that stay on the target's origin (same scheme, host and port) are
    followed: the credential must never leave it, and https -> http changes the origin.
    """
    if status not in REDIRECT_STATUSES or not location:
        return None
    try:
        nxt = current.join(URL(location))
    except ValueError:
        return None
    if not nxt.absolute or nxt.origin() != origin:
        return None
    return nxt.with_fragment(None)


def redirect_method(status: int, method: str) -> tuple[str, bool]:
    """(method, keep body) for following a redirect, as browsers and RFC 9110 do."""
    if status == 303 and method != hdrs.METH_HEAD:
        return hdrs.METH_GET, False
    if status in (301, 302) and method == hdrs.METH_POST:
        return hdrs.METH_GET, False
    return method, True


# --- answers the proxy gives instead of the target's auth challenge ---------------------

# Retry-After on the 503 that replaces the target's 401: a person (or a sign-in) must act,
# so clients should not hammer; short enough that a healed credential is used soon.
UPSTREAM_UNAUTHORIZED_RETRY_AFTER = 10
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.")
# RFC 6749 §3.3 scope-token characters, plus the space between tokens.
_SCOPE_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\') | {" "}


def _safe(text: str | None, allowed: frozenset[str], limit: int) -> str | None:
    """The target's text only when it is short and made of `allowed` characters."""
    if not text or len(text) > limit or not set(text) <= allowed:
        return None
    return text


def held_auth_answer(status: int, challenge: BearerError, workload: str,
                     fix: str) -> tuple[int, dict[str, str], bytes] | None:
    """What the client gets instead of the target's 401 / 403 `insufficient_scope` when
    the proxy owns the credential: (status, headers, JSON body), or None to pass it on.

    The target's challenge never reaches the client: an OAuth-capable client would
    follow its `resource_metadata` around the proxy to the target's authorization
    server, where it cannot repair the proxy's credential. Nothing of the target's text
    is quoted but its RFC 6750 error code and scope tokens, checked character by
    character (a challenge may echo what it was sent).
    """
    if status == 401:
        code = _safe(challenge.error, _TOKEN_CHARS, 64)
        said = f" ({code})" if code else ""
        message = (f"workload {workload}: the target rejected the proxy's credential{said}; "
                   f"to fix: {fix}")
        return 503, {hdrs.RETRY_AFTER: str(UPSTREAM_UNAUTHORIZED_RETRY_AFTER)}, error_body(
            "upstream_unauthorized", message, workload=workload)
    if status == 403 and challenge.error == "insufficient_scope":
        scope = _safe(challenge.scope, _SCOPE_CHARS, 512)
        asked = f"scope {scope}" if scope else "a scope it did not name"
        message = (f"workload {workload}: the target needs {asked} that the proxy's "
                   f"credential lacks; to fix: {fix}")
        extra = {"scope": scope} if scope else {}
        return 403, {}, error_body("insufficient_scope", message, workload=workload, **extra)
    return None
