"""WWW-Authenticate parsing: RFC examples, odd but legal forms, and hostile input."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as hs

from proxy.credentials.challenge import BearerError, Challenge, bearer_error, parse_challenges


def test_rfc9110_example_with_two_challenges_and_escapes() -> None:
    """The RFC 9110 §11.6.1 example yields both challenges, with the escaped quote unescaped."""
    header = ('Newauth realm="apps", type=1, title="Login to \\"apps\\"", '
              'Basic realm="simple"')
    assert parse_challenges(header) == [
        Challenge("newauth", {"realm": "apps", "type": "1", "title": 'Login to "apps"'}),
        Challenge("basic", {"realm": "simple"}),
    ]


def test_rfc6750_expired_token_example() -> None:
    """The RFC 6750 §3 expired-token challenge gives its error and description."""
    header = ('Bearer realm="example", error="invalid_token", '
              'error_description="The access token expired"')
    assert bearer_error(header) == BearerError(
        error="invalid_token", error_description="The access token expired")


def test_rfc9728_resource_metadata() -> None:
    """An MCP server's challenge names its protected-resource metadata URL (RFC 9728 §5.1)."""
    header = ('Bearer resource_metadata='
              '"https://resource.example.com/.well-known/oauth-protected-resource"')
    assert bearer_error(header).resource_metadata == (
        "https://resource.example.com/.well-known/oauth-protected-resource")


def test_insufficient_scope_gives_scope() -> None:
    """A 403 challenge's requested scope is read, spaces and all."""
    header = 'Bearer error="insufficient_scope", scope="files:read files:write"'
    error = bearer_error(header)
    assert (error.error, error.scope) == ("insufficient_scope", "files:read files:write")


def test_case_insensitive_scheme_and_names() -> None:
    """Scheme and parameter names match whatever case the server uses; values keep theirs."""
    [challenge] = parse_challenges('BEARER Error="Invalid_Token"')
    assert challenge == Challenge("bearer", {"error": "Invalid_Token"})
    assert bearer_error('bEaReR ERROR=x').error == "x"


def test_several_header_lines() -> None:
    """Challenges spread over several header lines are all read, in order."""
    got = parse_challenges(['Basic realm="a"', 'Bearer error="invalid_token"'])
    assert [c.scheme for c in got] == ["basic", "bearer"]
    assert bearer_error(['Basic realm="a"', 'Bearer error="invalid_token"']).error == (
        "invalid_token")


def test_token68_and_bare_schemes() -> None:
    """A token68 credential-style challenge and parameterless schemes are kept apart."""
    assert parse_challenges("Negotiate abc+/def==, Basic, Bearer") == [
        Challenge("negotiate", token68="abc+/def=="),
        Challenge("basic"),
        Challenge("bearer"),
    ]


def test_bad_whitespace_around_equals_and_empty_elements() -> None:
    """Optional whitespace around `=` and empty list elements are tolerated."""
    assert parse_challenges(' , Bearer realm = "x" ,, scope=a ,') == [
        Challenge("bearer", {"realm": "x", "scope": "a"})]


def test_malformed_input_yields_what_it_can() -> None:
    """Junk before, inside or after a challenge does not hide the readable ones."""
    assert bearer_error('@@@, Bearer error="invalid_token" junk junk').error == "invalid_token"
    assert bearer_error('Bearer error="unterminated').error == "unterminated"
    assert parse_challenges("") == []
    assert parse_challenges('=, "x", Basic realm=1') == [Challenge("basic", {"realm": "1"})]


def test_no_bearer_challenge() -> None:
    """Without a Bearer challenge every error field is None."""
    assert bearer_error('Basic realm="x"') == BearerError()
    assert bearer_error([]) == BearerError()


def test_first_parameter_wins() -> None:
    """A repeated parameter name keeps its first value (RFC 9110 allows it only once)."""
    assert bearer_error("Bearer error=a, error=b").error == "a"


@given(hs.text())
def test_never_raises_on_arbitrary_text(text: str) -> None:
    """Whatever the target sends, parsing returns challenges instead of raising."""
    for challenge in parse_challenges(text):
        assert challenge.scheme == challenge.scheme.lower()
        assert all(k == k.lower() for k in challenge.params)
    bearer_error([text, text])


_token = hs.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#$%&'*+^`|~",
                 min_size=1, max_size=12)
_value = hs.text(hs.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(hs.lists(hs.tuples(_token, hs.dictionaries(_token, _value, min_size=1, max_size=4)),
                min_size=1, max_size=4))
def test_well_formed_headers_round_trip(challenges: list[tuple[str, dict[str, str]]]) -> None:
    """Any well-formed list of challenges with quoted values is read back exactly."""
    header = ", ".join(
        scheme + " " + ", ".join(f"{k}={_quote(v)}" for k, v in params.items())
        for scheme, params in challenges
    )
    expected = []
    for scheme, params in challenges:
        lowered: dict[str, str] = {}
        for k, v in params.items():
            lowered.setdefault(k.lower(), v)
        expected.append(Challenge(scheme.lower(), lowered))
    assert parse_challenges(header) == expected
