"""The request path: checks, the credential, the exchange with the target, the relays.

`handler` forwards one request, `relay` moves response bodies by one of three named
paths (`complete`, `pushed`, `rewritten`; `relay.relay_path` decides), `rules` holds the pure
header, URL, guard and redirect rules, `sse` rewrites the legacy `endpoint` event,
`listener` owns the listening socket, `observe` is what watchers of the traffic see.
"""
