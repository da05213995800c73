"""The one head serializer (`proxy.wire.head`): what it refuses and what it keeps exactly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.wire.head import serialize_head

CONTROLS = [chr(c) for c in (*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F)]


@pytest.mark.parametrize("char", CONTROLS, ids=[f"0x{ord(c):02x}" for c in CONTROLS])
@pytest.mark.parametrize("where", ["value", "line"])
def test_every_control_character_but_tab_is_refused(char: str, where: str) -> None:
    """CR, LF, NUL, ESC, DEL and every other control but TAB, in a value or the first line,
    raise before a byte is produced: a header never becomes two, nor a second message."""
    line, value = "HTTP/1.1 200 OK", "a"
    if where == "value":
        value = f"a{char}b"
    else:
        line = f"HTTP/1.1 200 O{char}K"
    with pytest.raises(ValueError):
        serialize_head(line, [("X-A", value)])


@pytest.mark.parametrize("name", ["X A", "X:A", "", "X\r\nY", "Ä"])
def test_a_name_that_is_not_a_token_is_refused(name: str) -> None:
    """A field name with a space, a colon, a line break or a non-ASCII letter is refused."""
    with pytest.raises(ValueError):
        serialize_head("HTTP/1.1 200 OK", [(name, "1")])


def test_tab_and_obs_text_pass_exactly() -> None:
    """TAB inside a value and bytes above 0x7F (latin-1 text) come out as the same bytes."""
    head = serialize_head("HTTP/1.1 200 D\xe9j\xe0 vu",
                          [("Content-Disposition", 'attachment; filename="r\xe9sum\xe9.txt"'),
                           ("X-Tab", "a\tb")])
    assert head == (b'HTTP/1.1 200 D\xe9j\xe0 vu\r\nContent-Disposition: attachment; '
                    b'filename="r\xe9sum\xe9.txt"\r\nX-Tab: a\tb\r\n\r\n')


def test_text_beyond_latin1_is_refused() -> None:
    """A value that is not bytes-as-latin-1 (it came from nowhere on the wire) is refused."""
    with pytest.raises(ValueError):
        serialize_head("HTTP/1.1 200 OK", [("X-A", "\u2603")])


@given(st.lists(st.tuples(st.from_regex(r"[A-Za-z0-9-]{1,12}", fullmatch=True),
                          st.text(st.characters(min_codepoint=0, max_codepoint=255)))))
def test_a_head_either_parses_back_to_its_fields_or_is_refused(
    fields: list[tuple[str, str]]
) -> None:
    """Whatever the values hold, the head has exactly one line per field, or is refused."""
    try:
        head = serialize_head("HTTP/1.1 200 OK", fields)
    except ValueError:
        assert any(any(c in CONTROLS for c in value) for _, value in fields)
        return
    lines = head.decode("latin-1").split("\r\n")
    assert lines[-2:] == ["", ""] and len(lines) == len(fields) + 3
    assert [tuple(line.split(": ", 1)) for line in lines[1:-2]] == fields
