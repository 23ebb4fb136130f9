"""engine.event_loop: uvloop by default when installed, the standard loop on request, clear errors."""

from __future__ import annotations

import asyncio
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

