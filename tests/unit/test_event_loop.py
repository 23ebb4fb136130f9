"""engine.event_loop: uvloop by default when installed, the standard loop on request, clear errors."""

from __future__ import annotations

import asyncio
import time
import warnings

import pytest

from engine import event_loop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_serves_on_uvloop_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")
    monkeypatch.delenv("DNSGATE_EVENT_LOOP", raising=False)
    assert event_loop.run(_loop_module()).startswith("uvloop")


def test_asyncio_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DNSGATE_EVENT_LOOP", "asyncio")
    assert event_loop.run(_loop_module()).startswith("asyncio")


def test_an_unknown_choice_is_refused_and_the_coroutine_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DNSGATE_EVENT_LOOP", "trio")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine was never awaited" would be a RuntimeWarning
        with pytest.raises(event_loop.EventLoopError, match="DNSGATE_EVENT_LOOP='trio'"):
            event_loop.run(_loop_module())



def test_the_engine_clock_resolves_microseconds_on_uvloop() -> None:
    """uvloop's loop.time() is libuv's cached millisecond tick: an engine clocked by it measured every DNS
    upstream latency as 0 or 1 ms. The engine clock must tell apart two moments 200 µs apart."""
    uvloop = pytest.importorskip("uvloop")
    from engine.profile import profile_from_dict
    from engine.runtime import Engine

    loop = uvloop.new_event_loop()
    try:
        engine = Engine(profile_from_dict({"engine": {"plugins": ["quic_block"]}}, file="<test>"), None, loop=loop)

        async def measure() -> tuple[float, float]:
            first = engine.now()
            until = time.perf_counter() + 200e-6
            while time.perf_counter() < until:
                pass
            return first, engine.now()

        # A millisecond tick gives 0 or 1 ms, never in between; a busy machine may stretch one try.
        gaps = [second - first for first, second in (loop.run_until_complete(measure()) for _ in range(5))]
        assert any(150e-6 < gap < 900e-6 for gap in gaps), gaps
    finally:
        loop.close()
