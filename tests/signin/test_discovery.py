"""Discovery's pure rules: which URLs are tried, which documents are believed."""

from __future__ import annotations

import pytest

from proxy.credentials.discovery import (
    parse_resource_metadata,
    parse_server_metadata,
    require_https,
    resource_matches,
    resource_metadata_urls,
    server_metadata_urls,
)
from proxy.credentials.login import authorization_url, check_token_answer, pkce_pair
from proxy.errors import SignInError


def test_resource_metadata_urls_path_aware_first() -> None:
    """RFC 9728: the path-aware well-known URL first, then the origin's."""
    assert resource_metadata_urls("https://mcp.example/v1/mcp?key=x") == [
        "https://mcp.example/.well-known/oauth-protected-resource/v1/mcp",
        "https://mcp.example/.well-known/oauth-protected-resource",
    ]
    assert resource_metadata_urls("https://mcp.example/") == [
        "https://mcp.example/.well-known/oauth-protected-resource"]


def test_server_metadata_urls_follow_the_mcp_spec() -> None:
    """An issuer with a path: RFC 8414 insertion, OIDC insertion, OIDC appending."""
    assert server_metadata_urls("https://auth.example/tenant1") == [
        "https://auth.example/.well-known/oauth-authorization-server/tenant1",
        "https://auth.example/.well-known/openid-configuration/tenant1",
        "https://auth.example/tenant1/.well-known/openid-configuration",
    ]
    assert server_metadata_urls("https://auth.example") == [
        "https://auth.example/.well-known/oauth-authorization-server",
        "https://auth.example/.well-known/openid-configuration",
    ]


@pytest.mark.parametrize(("resource", "ok"), [
    ("https://mcp.example/v1/mcp", True),
    ("https://mcp.example/v1/mcp/", True),
    ("https://mcp.example/v1", True),
    ("https://mcp.example", True),
    ("https://mcp.example/v2", False),
    ("https://mcp.example/v1/mc", False),
    ("https://other.example/v1/mcp", False),
    ("http://mcp.example/v1/mcp", False),
    ("https://mcp.example/v1/mcp?x=1", False),
])
def test_resource_must_be_the_target_or_a_prefix(resource: str, ok: bool) -> None:
    """The metadata speaks for the target, its origin or a path prefix of it, no other."""
    assert resource_matches(resource, "https://mcp.example/v1/mcp?key=secret") is ok


@pytest.mark.parametrize(("url", "ok"), [
    ("https://as.example/token", True),
    ("http://127.0.0.1:8080/token", True),
    ("http://localhost/token", True),
    ("http://[::1]:9/token", True),
    ("http://as.example/token", False),
    ("ftp://as.example/token", False),
])
def test_endpoints_must_be_https_except_loopback(url: str, ok: bool) -> None:
    """Codes and tokens never cross the network in the clear."""
    if ok:
        assert require_https(url, "token_endpoint", "step") == url
    else:
        with pytest.raises(SignInError, match="token_endpoint"):
            require_https(url, "token_endpoint", "step")


def test_server_metadata_issuer_must_match() -> None:
    """A document whose issuer is not the one asked for is refused (mix-up attacks)."""
    doc = {"issuer": "https://evil.example", "token_endpoint": "https://evil.example/t"}
    with pytest.raises(SignInError) as caught:
        parse_server_metadata("https://as.example/.well-known/x", doc, "https://as.example")
    assert caught.value.code == "issuer_mismatch"


def test_server_metadata_http_endpoint_refused() -> None:
    """An https issuer naming a plain-http token endpoint is refused."""
    doc = {"issuer": "https://as.example", "token_endpoint": "http://as.example/token"}
    with pytest.raises(SignInError, match="must be https"):
        parse_server_metadata("https://as.example/m", doc, "https://as.example")


def test_resource_metadata_needs_an_authorization_server() -> None:
    """Metadata naming no authorization server cannot start a sign-in."""
    with pytest.raises(SignInError, match="names no authorization server"):
        parse_resource_metadata("https://mcp.example/m",
                                {"resource": "https://mcp.example/mcp"},
                                "https://mcp.example/mcp")


def test_pkce_pair_is_s256() -> None:
    """The challenge is BASE64URL(SHA256(verifier)) without padding (RFC 7636 §4.2)."""
    import base64
    import hashlib

    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128
    expected = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    assert challenge == expected.rstrip(b"=").decode()
    assert pkce_pair()[0] != verifier


def test_authorization_url_carries_resource_state_and_s256() -> None:
    """The request names the resource (RFC 8707), the state and the S256 challenge, and
    keeps any query the endpoint already has."""
    url = authorization_url("https://as.example/auth?tenant=a", client_id="c",
                            redirect_uri="http://127.0.0.1:5/callback", state="st",
                            challenge="ch", resource="https://mcp.example/mcp",
                            scopes=("a", "b"))
    from yarl import URL

    query = URL(url).query
    assert query["tenant"] == "a"
    assert query["resource"] == "https://mcp.example/mcp"
    assert query["code_challenge_method"] == "S256"
    assert query["state"] == "st" and query["scope"] == "a b"


@pytest.mark.parametrize(("status", "body", "code"), [
    (400, b'{"error": "invalid_grant", "error_description": "code used"}', "invalid_grant"),
    (200, b'{"access_token": "t", "token_type": "mac"}', "unsupported_token_type"),
    (200, b'{"token_type": "Bearer"}', "invalid_response"),
    (200, b'{"access_token": "t", "token_type": "Bearer", "expires_in": "soon"}',
     "invalid_response"),
    (502, b"<html>bad gateway</html>", "http_502"),
])
def test_token_answers_are_checked(status: int, body: bytes, code: str) -> None:
    """A token answer that is not a Bearer token with a lifetime is refused by its code."""
    with pytest.raises(SignInError) as caught:
        check_token_answer(status, body, "token request")
    assert caught.value.code == code


def test_a_good_token_answer() -> None:
    """Bearer (any case), expires_in, refresh token and scope are read."""
    answer = check_token_answer(200, b'{"access_token": "t", "token_type": "bearer", '
                                b'"expires_in": 60, "refresh_token": "r", "scope": "a b"}',
                                "token request")
    assert (answer.expires_in, answer.scope) == (60.0, ("a", "b"))
    assert "t" not in repr(answer).replace("TokenAnswer", "")
