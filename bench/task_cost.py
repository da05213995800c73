"""What a request's task costs on uvloop, against plain calls from a socket callback.

Issue 14 asks whether starting the upstream request from the parser callback, instead
of a task per request, would close the CPU gap to Go. This times the machinery alone: a
task per request running a six-deep await chain (as `_serve` -> `Forwarder.__call__` ->
`_forward` -> `_exchange` -> `_send` -> `UpstreamPool.request` do) on a future another
callback resolves, against six plain calls made from a callback. Process CPU time, so
pin it to an idle core: `taskset -c 1 .venv/bin/python bench/task_cost.py`.
"""

from __future__ import annotations

import asyncio
import time

import uvloop

N = 200_000


async def _l6(fut: asyncio.Future[None]) -> None:
    await fut


async def _l5(fut: asyncio.Future[None]) -> None:
    await _l6(fut)


async def _l4(fut: asyncio.Future[None]) -> None:
    await _l5(fut)


async def _l3(fut: asyncio.Future[None]) -> None:
    await _l4(fut)


async def _l2(fut: asyncio.Future[None]) -> None:
    await _l3(fut)


async def _l1(fut: asyncio.Future[None]) -> None:
    await _l2(fut)


def _s6() -> None:
    return None


def _s5() -> None:
    return _s6()


def _s4() -> None:
    return _s5()


def _s3() -> None:
    return _s4()


def _s2() -> None:
    return _s3()


def _s1() -> None:
    return _s2()


async def main() -> None:
    loop = asyncio.get_running_loop()
    began = time.process_time()
    for _ in range(N):
        fut: asyncio.Future[None] = loop.create_future()
        task = loop.create_task(_l1(fut))
        loop.call_soon(fut.set_result, None)
        await task
    tasks = (time.process_time() - began) / N * 1e6
    began = time.process_time()
    for _ in range(N):
        loop.call_soon(_s1)
        await asyncio.sleep(0)
    calls = (time.process_time() - began) / N * 1e6
    print(f"a task, a six-deep await chain and a future: {tasks:.1f} µs per request")
    print(f"six plain calls from a callback:             {calls:.1f} µs per request")
    print(f"difference:                                  {tasks - calls:.1f} µs per request")


if __name__ == "__main__":
    uvloop.run(main())
