"""DeadlineQueue on a real event loop: order, cancellation, one loop timer, compaction, errors contained."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from engine import deadlines as deadlines_module
from engine.deadlines import SLACK, DeadlineQueue


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _run(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    loop.run_until_complete(asyncio.sleep(seconds))


def test_callbacks_fire_in_deadline_order_and_cancelled_ones_never(loop: asyncio.AbstractEventLoop) -> None:
    queue = DeadlineQueue(loop, loop.time)
    fired: list[str] = []
    now = loop.time()
    queue.add(now + 0.03, lambda: fired.append("c"))
    queue.add(now + 0.01, lambda: fired.append("a"))
    dropped = queue.add(now + 0.02, lambda: fired.append("never"))
    queue.add(now + 0.02, lambda: fired.append("b"))
    queue.cancel(dropped)
    queue.cancel(dropped)  # twice is harmless
    assert len(queue) == 3
    _run(loop, 0.06)
    assert fired == ["a", "b", "c"] and len(queue) == 0


def test_one_loop_timer_moved_only_for_a_clearly_earlier_deadline(loop: asyncio.AbstractEventLoop) -> None:
    queue = DeadlineQueue(loop, loop.time)
    now = loop.time()
    queue.add(now + 1.0, lambda: None)
    first = queue._timer
    queue.add(now + 1.0 - SLACK / 2, lambda: None)  # within the slack: the armed timer stays
    assert queue._timer is first
    queue.add(now + 0.5, lambda: None)  # clearly earlier: re-armed
    assert queue._timer is not first and queue._timer is not None
    queue.close()


def test_a_failing_callback_does_not_stop_the_others(loop: asyncio.AbstractEventLoop) -> None:
    queue = DeadlineQueue(loop, loop.time)
    fired: list[str] = []

    def broken() -> None:
        raise RuntimeError("timer bug")

    now = loop.time()
    queue.add(now + 0.01, broken)
    queue.add(now + 0.01, lambda: fired.append("after"))

    def add_another() -> None:
        queue.add(loop.time() + 0.01, lambda: fired.append("added by a callback"))

    queue.add(now + 0.02, add_another)
    _run(loop, 0.08)
    assert fired == ["after", "added by a callback"] and queue.errors == 1


def test_cancelled_entries_are_compacted(loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deadlines_module, "_COMPACT_MIN", 10)
    queue = DeadlineQueue(loop, loop.time)
    now = loop.time()
    tickets = [queue.add(now + 60 + i, lambda: None) for i in range(40)]
    for ticket in tickets[:30]:
        queue.cancel(ticket)
    assert len(queue) == 10 and len(queue._heap) < 40  # rebuilt without most cancelled entries
    queue.close()
