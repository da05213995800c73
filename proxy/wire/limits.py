"""Every size limit of the HTTP layer, named once.

A header line (request line, status line, one header field) may be as long as a whole
head: large cookies and tokens are the target's to judge, not ours to cap at 8 KiB.
The head as a whole is bounded separately (contract: 431 for a client's, 502 for a
target's), which is what bounds memory per connection.
"""

MAX_HEADER_LINE = 64 * 1024  # one request/status line or header field, in bytes
MAX_CHUNK_LINE = MAX_HEADER_LINE  # a chunk-size line with its extensions
MAX_HEAD_BYTES = 64 * 1024  # request or response line plus all header fields
MAX_HEADERS = 128  # header fields in one request head (431 above), as aiohttp's servers allow
