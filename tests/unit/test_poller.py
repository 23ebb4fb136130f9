"""engine.poller on a real event loop with socket pairs: level-triggered readers and writers, one
registration per descriptor, swaps, errors contained, closing."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from engine.poller import Poller


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _spin(loop: asyncio.AbstractEventLoop, times: int = 3) -> None:
    for _ in range(times):
        loop.run_until_complete(asyncio.sleep(0.01))


def test_reader_is_level_triggered_and_cleared(loop: asyncio.AbstractEventLoop, pair: Any) -> None:
    a, b = pair
    poller = Poller(loop)
    calls: list[bytes] = []
    poller.set_reader(a.fileno(), lambda: calls.append(b"r"))
    _spin(loop)
    assert calls == []  # nothing to read yet
    b.send(b"x")
    _spin(loop)
    assert len(calls) >= 2  # still readable: called again on each round, like asyncio
    poller.clear_reader(a.fileno())
    calls.clear()
    _spin(loop)
    assert calls == [] and len(poller) == 0
    poller.close()


def test_set_swaps_writer_for_reader_in_one_registration(loop: asyncio.AbstractEventLoop, pair: Any) -> None:
    a, b = pair
    poller = Poller(loop)
    events: list[str] = []

    def connected() -> None:
        events.append("writable")
        poller.set(a.fileno(), lambda: events.append(a.recv(10).decode()), None)

    poller.set(a.fileno(), None, connected)
    _spin(loop)
    assert events == ["writable"] and len(poller) == 1
    b.send(b"hi")
    _spin(loop, 1)
    assert events[:2] == ["writable", "hi"]
    poller.forget(a.fileno())
    assert len(poller) == 0
    poller.close()


def test_reader_and_writer_on_one_descriptor(loop: asyncio.AbstractEventLoop, pair: Any) -> None:
    a, b = pair
    poller = Poller(loop)
    seen: set[str] = set()
    poller.set_writer(a.fileno(), lambda: seen.add("w"))
    poller.set_reader(a.fileno(), lambda: seen.add("r"))
    b.send(b"x")
    _spin(loop)
    assert seen == {"r", "w"}
    poller.clear_writer(a.fileno())
    seen.clear()
    _spin(loop)
    assert seen == {"r"}
    poller.close()


def test_a_failing_callback_is_reported_and_the_others_still_run(loop: asyncio.AbstractEventLoop) -> None:
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    poller = Poller(loop)
    ran: list[str] = []

    def broken() -> None:
        a1.recv(10)
        raise RuntimeError("callback bug")

    try:
        poller.set_reader(a1.fileno(), broken)
        poller.set_reader(a2.fileno(), lambda: ran.append(a2.recv(10).decode()))
        b1.send(b"1")
        b2.send(b"2")
        _spin(loop)
        assert ran == ["2"] and poller.errors == 1
        assert isinstance(reported[0]["exception"], RuntimeError)
    finally:
        poller.close()
        for sock in (a1, b1, a2, b2):
            sock.close()


def test_closed_poller_refuses_registrations_and_ignores_forget(loop: asyncio.AbstractEventLoop, pair: Any) -> None:
    a, _b = pair
    poller = Poller(loop)
    poller.set_reader(a.fileno(), lambda: None)
    poller.close()
    poller.forget(a.fileno())  # sockets closed after the engine stopped: no error
    with pytest.raises(RuntimeError):
        poller.set_reader(a.fileno(), lambda: None)
