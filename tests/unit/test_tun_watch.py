"""The TUN is watched with ``loop.add_reader`` (engine/runtime.py ``attach``), not through the engine's
Poller: its only error condition is "the interface is gone". That path must end the engine cleanly on both
loops, uvloop included, where the first EPOLLERR runs the reader once and then drops the descriptor.

Needs root and /dev/net/tun (skipped otherwise); no traffic leaves the test's own namespace."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from engine.io.tun import TunDevice
from engine.linux import netns as nl

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
)


@pytest.fixture
def ns() -> Iterator[str]:
    with nl.Cleanup() as cleanup:
        yield cleanup.netns(nl.unique_name("dgtwatch"))


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_deleted_tun_stops_the_engine_with_status_1_on_either_loop(ns: str, loop: str) -> None:
    from engine.commands.serve import run_engine
    from engine.profile import profile_from_dict

    runner = asyncio.run
    if loop == "uvloop":
        runner = pytest.importorskip("uvloop").run
    dev = TunDevice.open("tun0", netns=ns)
    nl.link_up(dev.name, netns=ns)
    nl.add_address(dev.name, "10.0.0.2/24", netns=ns)
    profile = profile_from_dict({"engine": {"plugins": ["dns_filter"], "fwmark": 0}}, file="<test>")

    async def serve_then_delete() -> tuple[int, str]:
        served = asyncio.create_task(run_engine(profile, dev, announce=False))
        await asyncio.sleep(0.3)
        assert not served.done()
        nl.delete_link("tun0", netns=ns)
        return await asyncio.wait_for(served, 5), type(asyncio.get_running_loop()).__module__

    try:
        status, module = runner(serve_then_delete())
    finally:
        dev.close()
    assert module.startswith(loop)
    assert status == 1 and dev.lost is not None and "deleted" in dev.lost
