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

# Control characters but TAB, CR and LF (those two are counted instead).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# RFC 9110 §5.6.2 token: what a field name may be.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NAMES_OK: set[str] = set()  # names already checked (the same dozen come every time)
_NAMES_KEPT = 512


def serialize_head(first_line: str, fields: Iterable[tuple[str, str]]) -> bytes:
    """`first_line` CRLF, each `name: value` CRLF, then the empty line, in latin-1.

    Raises ValueError for a control character in the line or a value, or a name that is
    not a token (and UnicodeEncodeError, a ValueError, for text beyond latin-1).
    """
    parts = [first_line]
    names_ok = _NAMES_OK
    for name, value in fields:
        if name not in names_ok:
            if _TOKEN.fullmatch(name) is None:
                raise ValueError("header name is not a token")
            if len(names_ok) < _NAMES_KEPT:
                names_ok.add(name)
        parts.append(f"{name}: {value}")
    text = "\r\n".join(parts)
    # The only CR and LF allowed are the ones joined in above: three scans of the whole
    # head instead of one per field.
    breaks = len(parts) - 1
    if (text.count("\n") != breaks or text.count("\r") != breaks
            or _CONTROL.search(text) is not None):
        raise ValueError("control character in the message head")
    return (text + "\r\n\r\n").encode("latin-1")


_date = [0, ""]


def http_date() -> str:
    """The `Date` header value for now, computed at most once a second."""
    now = int(time.time())
    if _date[0] != now:
        _date[0] = now
        _date[1] = formatdate(now, usegmt=True)
    return str(_date[1])
