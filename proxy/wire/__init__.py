"""HTTP/1.1 on the wire, and nothing MCP- or auth-specific.

`server` serves clients, `client` holds the upstream connections, `chunked` frames and
unframes chunked bodies, `limits` names every size limit once. This package imports
nothing from `forwarding`, `monitor` or `credentials`.
"""
