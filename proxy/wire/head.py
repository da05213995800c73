"""Message heads as bytes: the status or request line and header fields, serialized.

Header names and values are latin-1 text (the parsers decode them that way), so every
byte a peer sent, obs-text included, goes on exactly as it came. Serialization refuses
(ValueError) a CR, LF, NUL or any other control character but TAB in a name, value or
the first line: one header must never become two, or a second message. It must never
write anything itself, nor normalize what it is given.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from email.utils import formatdate
from operator import itemgetter

# Control characters but TAB, CR and LF included: what no field value or first line holds.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9110 §5.6.2 token: what a field name may be.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NAMES_OK: set[str] = set()  # names already checked (the same dozen come every time)
_NAMES_KEPT = 512
_name = itemgetter(0)


def serialize_head(first_line: str, fields: Iterable[tuple[str, str]]) -> bytes:
    """`first_line` CRLF, each `name: value` CRLF, then the empty line, in latin-1.

    Raises ValueError for a control character in the line or a value, or a name that is
    not a token (and UnicodeEncodeError, a ValueError, for text beyond latin-1).
    """
    fields = list(fields)
    if not _NAMES_OK.issuperset(map(_name, fields)):
        for name, _ in fields:
            if _TOKEN.fullmatch(name) is None:
                raise ValueError("header name is not a token")
            if len(_NAMES_OK) < _NAMES_KEPT:
                _NAMES_OK.add(name)
    lines = list(map(": ".join, fields))
    # The usual head is printable ASCII: one C-level scan; anything else (TAB, obs-text,
    # or a control character) gets the exact check.
    flat = "".join(lines)
    if not (flat.isprintable() and first_line.isprintable()) and (
            _CONTROL.search(flat) is not None or _CONTROL.search(first_line) is not None):
        raise ValueError("control character in the message head")
    lines.insert(0, first_line)
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


_date = [0, ""]


def http_date() -> str:
    """The `Date` header value for now, computed at most once a second."""
    now = int(time.time())
    if _date[0] != now:
        _date[0] = now
        _date[1] = formatdate(now, usegmt=True)
    return str(_date[1])
