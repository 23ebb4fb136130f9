"""The ``loop`` fixture that runs a test once on asyncio and once on uvloop (the loop dnsgate serves on),
and a helper that runs a loop until a condition holds. Shared by the poller's tests: what the poller
promises must hold on both loops, because their ways of watching a descriptor differ (engine/poller.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

LOOPS = ["asyncio", "uvloop"]


@pytest.fixture(params=LOOPS)
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def run_until(loop: asyncio.AbstractEventLoop, predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Run ``loop`` in 5 ms steps until ``predicate()`` is true (True) or ``timeout`` passed (False)."""

    async def wait() -> bool:
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    return loop.run_until_complete(wait())
