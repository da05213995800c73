"""HTTP/1.1 on the wire, and nothing MCP- or auth-specific.

`server` serves clients (a request's body arrives in a `body.BodyStream`, its answer
goes out as a `reply.Reply`), `client` holds the upstream connections (both on
httptools' public parsers), `session` is the aiohttp session for probes, `head`
serializes message heads, `chunked` frames chunked bodies (llhttp decodes them),
`limits` names every size limit once, `compat` is the one module that knows dependency
versions. This package imports nothing from `forwarding`, `monitor` or `credentials`,
and no private name of any library.
"""
