"""Finding a target's authorization server, the way MCP's authorization spec says.

1. An unauthenticated MCP `initialize` to the target; its 401's `WWW-Authenticate`
   names the protected resource metadata (RFC 9728 §5.1), else the well-known URLs at
   the target's origin are tried (path-aware first, then root).
2. The metadata's `resource` must be the target URL without its query, or an origin or
   path prefix of it (what the TypeScript SDK accepts): a document speaking for another
   resource would send the sign-in to an authorization server the target never named.
3. The authorization server's metadata: RFC 8414, then OpenID discovery, with the
   path-insertion variants the MCP spec lists; its `issuer` must be the one asked for.
4. Every authorization-server endpoint must be https (loopback hosts excepted, for
   testing): a sign-in over plain http would hand codes and tokens to the network.

Every failure is a `SignInError` naming the step. Nothing here sends or sees a
credential: discovery is public by definition.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import hdrs
from yarl import URL

from ..errors import SignInError
from ..log import redact_url
from .challenge import bearer_error

MAX_METADATA_BYTES = 256 * 1024
MCP_PROTOCOL_VERSION = "2025-11-25"
_INITIALIZE = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": MCP_PROTOCOL_VERSION, "capabilities": {},
               "clientInfo": {"name": "mcp-authproxy-login", "version": "1"}},
}


@dataclass(frozen=True, slots=True)
class ResourceMetadata:
    """RFC 9728 protected resource metadata, the fields a sign-in uses."""

    url: str  # where it was read
    resource: str
    authorization_servers: tuple[str, ...]
    scopes_supported: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    """RFC 8414 / OpenID authorization server metadata, the fields a sign-in uses."""

    issuer: str
    authorization_endpoint: str | None
    token_endpoint: str
    registration_endpoint: str | None
    device_authorization_endpoint: str | None
    code_challenge_methods: tuple[str, ...]
    scopes_supported: tuple[str, ...]
    client_id_metadata_document_supported: bool
    iss_parameter_supported: bool
    grant_types: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class Discovery:
    """What discovery found: the resource, its authorization server, the 401's scope."""

    target_url: str
    resource: str  # RFC 8707 `resource`: the target URL without its query
    resource_metadata: ResourceMetadata
    server: ServerMetadata
    challenge_scope: tuple[str, ...]


# --- pure helpers -----------------------------------------------------------------------


def resource_of(target_url: str) -> str:
    """The RFC 8707 resource for a target: its URL without query and fragment."""
    return str(URL(target_url).with_query(None).with_fragment(None))


def resource_metadata_urls(target_url: str) -> list[str]:
    """RFC 9728 §3.1 well-known URLs for a target: path-aware first, then the root."""
    url = URL(target_url)
    origin = url.origin()
    path = url.path.rstrip("/")
    urls = []
    if path:
        urls.append(str(origin.with_path("/.well-known/oauth-protected-resource" + path)))
    urls.append(str(origin.with_path("/.well-known/oauth-protected-resource")))
    return urls


def server_metadata_urls(issuer: str) -> list[str]:
    """The URLs the MCP spec lists for an issuer, in its order (RFC 8414 first)."""
    url = URL(issuer)
    origin = url.origin()
    path = url.path.rstrip("/")
    if not path:
        return [str(origin.with_path("/.well-known/oauth-authorization-server")),
                str(origin.with_path("/.well-known/openid-configuration"))]
    return [str(origin.with_path("/.well-known/oauth-authorization-server" + path)),
            str(origin.with_path("/.well-known/openid-configuration" + path)),
            str(origin.with_path(path + "/.well-known/openid-configuration"))]


def resource_matches(resource: str, target_url: str) -> bool:
    """The metadata's `resource` is the target, or an origin or path prefix of it."""
    try:
        claimed, target = URL(resource), URL(resource_of(target_url))
    except ValueError:
        return False
    if claimed.query_string or claimed.fragment or not claimed.is_absolute():
        return False
    if claimed.origin() != target.origin():
        return False
    prefix = claimed.path.rstrip("/")
    path = target.path.rstrip("/")
    return path == prefix or path.startswith(prefix + "/") or not prefix


def is_loopback_host(host: str | None) -> bool:
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_https(url: str, what: str, step: str) -> str:
    """`url` when it is https or on a loopback host, else the step fails naming `what`."""
    try:
        parsed = URL(url)
    except ValueError:
        raise SignInError(step, f"{what} is not a URL") from None
    if not parsed.is_absolute() or parsed.scheme not in ("https", "http"):
        raise SignInError(step, f"{what} {redact_url(url)} is not an http(s) URL")
    if parsed.scheme == "http" and not is_loopback_host(parsed.host):
        raise SignInError(step, f"{what} {redact_url(url)} must be https")
    return url


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str))


def parse_resource_metadata(url: str, doc: Mapping[str, Any], target_url: str
                            ) -> ResourceMetadata:
    """Pure: the checked RFC 9728 document (step "discovery")."""
    resource = doc.get("resource")
    if not isinstance(resource, str) or not resource:
        raise SignInError("discovery", f"resource metadata at {redact_url(url)} has no resource")
    if not resource_matches(resource, target_url):
        raise SignInError(
            "discovery",
            f"protected resource {resource} in {redact_url(url)} does not match the target "
            f"{redact_url(resource_of(target_url))}", "resource_mismatch")
    servers = _strings(doc.get("authorization_servers"))
    if not servers:
        raise SignInError("discovery",
                          f"resource metadata at {redact_url(url)} names no authorization server")
    return ResourceMetadata(url, resource, servers, _strings(doc.get("scopes_supported")))


def parse_server_metadata(url: str, doc: Mapping[str, Any], issuer: str) -> ServerMetadata:
    """Pure: the checked RFC 8414 document: `issuer` matches, endpoints https."""
    step = "authorization server metadata"
    claimed = doc.get("issuer")
    if claimed != issuer:
        raise SignInError(step, f"issuer {claimed!r} in {redact_url(url)} is not {issuer}",
                          "issuer_mismatch")
    token = doc.get("token_endpoint")
    if not isinstance(token, str):
        raise SignInError(step, f"{redact_url(url)} names no token_endpoint")

    def endpoint(name: str) -> str | None:
        value = doc.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise SignInError(step, f"{name} in {redact_url(url)} is not a URL")
        return require_https(value, name, step)

    return ServerMetadata(
        issuer=issuer,
        authorization_endpoint=endpoint("authorization_endpoint"),
        token_endpoint=require_https(token, "token_endpoint", step),
        registration_endpoint=endpoint("registration_endpoint"),
        device_authorization_endpoint=endpoint("device_authorization_endpoint"),
        code_challenge_methods=_strings(doc.get("code_challenge_methods_supported")),
        scopes_supported=_strings(doc.get("scopes_supported")),
        client_id_metadata_document_supported=doc.get(
            "client_id_metadata_document_supported") is True,
        iss_parameter_supported=doc.get("authorization_response_iss_parameter_supported") is True,
        grant_types=_strings(doc.get("grant_types_supported")),
        raw=dict(doc),
    )


# --- I/O -------------------------------------------------------------------------------


async def _get_json(session: aiohttp.ClientSession, url: str, step: str
                    ) -> dict[str, Any] | None:
    """The JSON object at `url`; None on 404/405/410 (try the next URL); else fails."""
    try:
        async with session.get(url, headers={hdrs.ACCEPT: "application/json",
                                             "MCP-Protocol-Version": MCP_PROTOCOL_VERSION},
                               allow_redirects=False) as response:
            if response.status in (404, 405, 410):
                return None
            if response.status != 200:
                raise SignInError(step, f"{redact_url(url)} answered {response.status}",
                                  f"http_{response.status}")
            body = await response.content.read(MAX_METADATA_BYTES + 1)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise SignInError(step, f"{redact_url(url)} could not be read "
                          f"({type(exc).__name__})", "network") from None
    if len(body) > MAX_METADATA_BYTES:
        raise SignInError(step, f"{redact_url(url)} is too large to be metadata")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise SignInError(step, f"{redact_url(url)} is not JSON") from None
    if not isinstance(doc, dict):
        raise SignInError(step, f"{redact_url(url)} is not a JSON object")
    return doc


async def probe_target(session: aiohttp.ClientSession, target_url: str
                       ) -> tuple[str | None, tuple[str, ...]]:
    """An unauthenticated `initialize`: the 401's `resource_metadata` URL and `scope`."""
    headers = {hdrs.ACCEPT: "application/json, text/event-stream",
               hdrs.CONTENT_TYPE: "application/json",
               "MCP-Protocol-Version": MCP_PROTOCOL_VERSION}
    try:
        async with session.post(target_url, json=_INITIALIZE, headers=headers,
                                allow_redirects=False) as response:
            status = response.status
            challenges = response.headers.getall(hdrs.WWW_AUTHENTICATE, [])
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise SignInError("discovery", f"the target {redact_url(target_url)} could not be "
                          f"reached ({type(exc).__name__})", "network") from None
    if status != 401:
        return None, ()  # no challenge to read: fall back to the well-known URLs
    found = bearer_error(challenges)
    scope = tuple(found.scope.split()) if found.scope else ()
    return found.resource_metadata, scope


async def discover(session: aiohttp.ClientSession, target_url: str) -> Discovery:
    """Every discovery step for `target_url`; raises `SignInError` naming the failed one."""
    metadata_url, challenge_scope = await probe_target(session, target_url)
    candidates = [metadata_url] if metadata_url else resource_metadata_urls(target_url)
    resource_doc: tuple[str, dict[str, Any]] | None = None
    for url in candidates:
        doc = await _get_json(session, url, "discovery")
        if doc is not None:
            resource_doc = (url, doc)
            break
    if resource_doc is None:
        raise SignInError("discovery", f"no protected resource metadata for "
                          f"{redact_url(resource_of(target_url))} (tried "
                          f"{', '.join(redact_url(u) for u in candidates)})", "not_found")
    resource_metadata = parse_resource_metadata(*resource_doc, target_url)
    issuer = resource_metadata.authorization_servers[0]
    require_https(issuer, "authorization server", "authorization server metadata")
    server: ServerMetadata | None = None
    tried = server_metadata_urls(issuer)
    for url in tried:
        doc = await _get_json(session, url, "authorization server metadata")
        if doc is not None:
            server = parse_server_metadata(url, doc, issuer)
            break
    if server is None:
        raise SignInError("authorization server metadata",
                          f"no metadata for {issuer} (tried {', '.join(tried)})", "not_found")
    return Discovery(target_url, resource_of(target_url), resource_metadata, server,
                     challenge_scope)
