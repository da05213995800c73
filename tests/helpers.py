"""What many test files share and a fixture cannot give: the wait bounds, one bounded
polling helper, and the chunked framing of a test body.

Import it by name (`from helpers import WAIT, eventually`): pytest puts `tests/` on
`sys.path` (tests/ has a conftest.py and no `__init__.py`), so this works from every
folder below it too.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

from proxy.wire.chunked import ChunkedPassthrough

# Bounds on every wait. Never reached when things work: the happy path takes milliseconds.
WAIT = 5.0  # an event in this process (a request, a callback, a file the proxy writes)
LONG_WAIT = 10.0  # another process or a real SDK on the far side (startup, drain, a hook)
SLOW_WAIT = 30.0  # a process under load, or a stream that must stay open that long

T = TypeVar("T")


async def eventually(predicate: Callable[[], T | Awaitable[T]], within: float = WAIT, *,
                     what: str = "", every: float = 0.01) -> T:
    """Poll `predicate` (plain or async) until it gives a true value, and return that value;
    raise AssertionError naming what was awaited if `within` seconds pass first.

    Only for state nothing signals (a file watcher, another process, a counter in the
    code under test): where there is an event, wait on the event.
    """
    try:
        async with asyncio.timeout(within) as bound:
            while True:
                value = predicate()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return value  # type: ignore[return-value]
                await asyncio.sleep(every)
    except TimeoutError:
        if not bound.expired():
            raise
        raise AssertionError(
            f"not true within {within} s: {what or _describe(predicate)}") from None


def _describe(predicate: Callable[..., object]) -> str:
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return getattr(predicate, "__qualname__", repr(predicate))


def chunk(data: bytes) -> bytes:
    """`data` as one chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def unchunk(framed: bytes) -> bytes:
    """The payload of chunks framed without their last chunk (checked by the proxy's own
    framing checker, which the tests of that checker prove separately)."""
    decoder = ChunkedPassthrough()
    out = decoder.decode(framed + b"0\r\n\r\n")
    assert decoder.done
    return out
