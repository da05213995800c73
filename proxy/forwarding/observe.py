"""What the forwarding path tells its observers (auth monitor, metrics), and nothing else.

Observers are called synchronously on the request path, so they must not do I/O or
block: anything slow (status-file writes, callbacks) is scheduled off the path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from multidict import CIMultiDictProxy

from ..credentials.base import Credential


@dataclass(slots=True)
class Exchange:
    """One request as seen by the proxy, filled in as it progresses."""

    method: str
    path: str  # the request's path (as sent to the target, without query)
    on_mcp_path: bool  # an MCP path (the final one): only its answers speak of the credential
    status: int = 0  # final answer to the client (upstream's, or the proxy's own)
    upstream_headers: CIMultiDictProxy[str] | None = None  # None when the proxy answered itself
    credential: Credential | None = None  # the credential sent with the final upstream request
    upstream_seconds: float | None = None  # time to the target's response headers
    sse: bool = False  # the answer is text/event-stream
    probe: bool = False  # a health probe, not a client's request


class ForwardObserver(Protocol):
    def on_response(self, exchange: Exchange) -> None:
        """The target's final response headers arrived (after redirects and a replay)."""

    def on_complete(self, exchange: Exchange, duration: float, bytes_out: int) -> None:
        """The client's response ended (completely, or aborted); also for the proxy's own."""
