"""The loopback redirect listener: only the answer carrying our `state` ends the wait."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from proxy.credentials.callback import CallbackListener
from proxy.errors import SignInError


async def test_only_the_right_state_is_taken() -> None:
    """Wrong, missing and non-ASCII states get 400 and the listener keeps waiting; the
    right one gets the close-the-tab page and ends the wait with its code."""
    listener = CallbackListener("the-state")
    await listener.start(0)
    try:
        waiting = asyncio.create_task(listener.wait(10))
        async with aiohttp.ClientSession() as session:
            for query in ({"code": "x", "state": "other"}, {"code": "x"},
                          {"code": "x", "state": "ünïcode"}):
                async with session.get(listener.redirect_uri, params=query) as response:
                    assert response.status == 400
            assert not waiting.done()
            async with session.get(listener.redirect_uri,
                                   params={"code": "c0de", "state": "the-state"}) as response:
                assert response.status == 200
                assert "close this tab" in await response.text()
            answer = await asyncio.wait_for(waiting, 5)
            async with session.get(listener.redirect_uri,
                                   params={"code": "again", "state": "the-state"}) as response:
                assert response.status == 400  # one answer per sign-in
    finally:
        await listener.close()

    assert answer["code"] == "c0de"
    assert listener.wrong_state == 3


async def test_timeout_after_a_wrong_state_names_state() -> None:
    """When the wait runs out after a refused answer, the error says `state`."""
    listener = CallbackListener("s")
    await listener.start(0)
    try:
        async with aiohttp.ClientSession() as session, session.get(
                listener.redirect_uri, params={"state": "forged", "code": "x"}) as response:
            assert response.status == 400
        with pytest.raises(SignInError) as caught:
            await listener.wait(0.2)
    finally:
        await listener.close()

    assert caught.value.code == "state"
    assert listener.redirect_uri.startswith("http://127.0.0.1:")
