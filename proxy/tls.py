"""The one place TLS client contexts are built: for the target, its token endpoint and
its authorization server alike.

Verification is never turned off here: system CAs (plus `--ca-file`), hostname checked.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(ca_file: str | Path | None = None) -> ssl.SSLContext:
    """System CAs plus `ca_file` (an extra bundle, e.g. a private CA), hostname-checked."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context
