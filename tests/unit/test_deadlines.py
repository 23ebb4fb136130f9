"""DeadlineQueue on a real event loop: order, cancellation, one loop timer, compaction, errors contained."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

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
    assert len(queue) == 10 and queue._stored < 40  # rebuilt without most cancelled entries
    assert len(queue._slot_heap) == len(queue._slots) <= 30  # and without the slots left empty
    queue.close()


class _FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_slot_fires_only_once_its_deadlines_have_passed(loop: asyncio.AbstractEventLoop) -> None:
    """Slots are milliseconds; the boundaries must never let a callback run before its deadline."""
    clock = _FakeClock(100.0)
    queue = DeadlineQueue(loop, clock)
    fired: list[float] = []
    deadlines = [100.0005, 100.001, 100.0019999, 100.002, 100.00200001]
    for deadline in deadlines:
        queue.add(deadline, lambda deadline=deadline: fired.append(deadline))
    for now in (100.0, 100.0005, 100.001, 100.0015, 100.0019999, 100.002, 100.0025, 100.003, 100.004):
        clock.now = now
        queue._fire()
        assert all(deadline < now for deadline in fired), (now, fired)
    assert sorted(fired) == deadlines and len(queue) == 0
    queue.close()


def test_same_millisecond_deadlines_fire_in_the_order_they_were_added(loop: asyncio.AbstractEventLoop) -> None:
    clock = _FakeClock(10.0)
    queue = DeadlineQueue(loop, clock)
    fired: list[str] = []
    queue.add(10.0107, lambda: fired.append("first"))
    queue.add(10.0101, lambda: fired.append("second"))
    queue.add(10.0105, lambda: fired.append("third"))
    clock.now = 10.02
    queue._fire()
    assert fired == ["first", "second", "third"]
    queue.close()


def test_a_callback_may_cancel_or_add_in_the_slot_being_fired(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a slot's tickets run they are out of the queue: a cancel of a later one must skip it, an add
    that is already due must run in the same pass, and a compaction must wait until the pass is over
    (else the counts behind ``len`` drift)."""
    monkeypatch.setattr(deadlines_module, "_COMPACT_MIN", 2)
    clock = _FakeClock(0.0)
    queue = DeadlineQueue(loop, clock)
    fired: list[str] = []
    spare = [queue.add(50.0 + i, lambda: None) for i in range(3)]
    later: list[list[object]] = []

    def first() -> None:
        fired.append("first")
        queue.cancel(later[0])  # type: ignore[arg-type]
        for ticket in spare:
            queue.cancel(ticket)  # over the (lowered) compaction threshold, during the pass
        queue.add(0.0012, lambda: fired.append("added, due"))

    queue.add(0.0011, first)
    later.append(queue.add(0.0013, lambda: fired.append("cancelled")))
    queue.add(0.0014, lambda: fired.append("last"))
    clock.now = 0.005
    queue._fire()
    assert fired == ["first", "last", "added, due"]
    assert len(queue) == 0 and queue._cancelled == len(spare) == queue._stored
    keep = queue.add(60.0, lambda: None)
    queue.cancel(queue.add(61.0, lambda: None))  # the next cancel compacts
    assert len(queue) == 1 and queue._stored == 1 and queue._cancelled == 0 and keep
    queue.close()


class _CountingLoop(asyncio.AbstractEventLoop):
    """The loop's clock and timers, counting how many loop timers the queue arms."""

    def __init__(self, inner: asyncio.AbstractEventLoop) -> None:
        self.inner = inner
        self.timers = 0

    def time(self) -> float:
        return self.inner.time()

    def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> asyncio.TimerHandle:
        self.timers += 1
        return self.inner.call_at(when, callback, *args)


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_each_deadline_takes_one_loop_timer_on_either_loop(kind: str) -> None:
    """The engine clock is CLOCK_MONOTONIC; uvloop's timers run on a cached millisecond clock and may
    fire before the deadline. The loop timer must not then be re-armed again and again until the
    deadline is reached (a busy loop: ~30 empty fires per short TCP connection before TIMER_GRAIN)."""
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        inner = uvloop.new_event_loop()
    else:
        inner = asyncio.new_event_loop()
    try:
        counting = _CountingLoop(inner)
        queue = DeadlineQueue(counting, time.monotonic)
        late: list[float] = []
        rounds = 25
        for index in range(rounds):
            done = inner.create_future()
            deadline = time.monotonic() + 0.002 + index * 0.00013  # different phases of the millisecond tick

            def fire(deadline: float = deadline, done: asyncio.Future[None] = done) -> None:
                late.append(time.monotonic() - deadline)
                done.set_result(None)

            queue.add(deadline, fire)
            inner.run_until_complete(asyncio.wait_for(done, 5))
        assert min(late) >= 0  # never before the deadline (the queue's promise)
        # One timer per deadline; a busy machine's stale loop clock may cost one more now and then. The busy
        # loop this guards against armed 290-1,000 timers for these 25 deadlines.
        assert counting.timers <= 2 * rounds
    finally:
        inner.close()
