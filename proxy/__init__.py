"""mcp-authproxy: a transparent reverse proxy for one remote MCP server.

It streams MCP traffic untouched, injects the configured outgoing credential, and
records the workload as `unauthenticated` when the target starts answering 401.
"""

from .app import AuthProxy
from .config import ProxyConfig
from .monitor.auth import ReauthorizedEvent, UnauthorizedEvent
from .status.model import WorkloadRecord, WorkloadStatus

__all__ = [
    "AuthProxy",
    "ProxyConfig",
    "ReauthorizedEvent",
    "UnauthorizedEvent",
    "WorkloadRecord",
    "WorkloadStatus",
]
__version__ = "0.1.0"
