"""Chunked transfer framing, written: the one place the proxy frames chunks.

Decoding is llhttp's (through httptools, in `server` and `client`): it checks sizes,
extensions and CRLFs strictly and hands over payload only. This module must never parse,
and never send anything itself.
"""

from __future__ import annotations

LAST_CHUNK = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """One chunk carrying `data` (which must not be empty: that is the last chunk)."""
    return b"%x\r\n%b\r\n" % (len(data), data)
