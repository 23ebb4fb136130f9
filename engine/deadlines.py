"""Many connection deadlines behind one asyncio timer.

Why: each user-space TCP connection has a deadline (retransmission, tail-loss probe, keepalive,
TIME_WAIT) that moves as it runs. One ``loop.call_at`` per arming meant a ``TimerHandle`` object, a
cancellation, and heap operations that compare handles through a Python-level ``__lt__``: about three
armings and two firings per short HTTP/1.0 connection, a visible share of its cost. Here deadlines are
``(time, sequence, ticket)`` tuples in one heap (compared in C), a cancelled ticket is just emptied, and a
single loop timer is armed for the earliest live deadline. TCP's timers do not need sub-millisecond
precision (RTO >= 200 ms, probe >= 10 ms, TIME_WAIT 1 s), so the loop timer is moved earlier only when a
new deadline beats it by more than :data:`SLACK`: under load, adding a deadline almost never touches the
loop's own heap.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from typing import Callable, Final

log = logging.getLogger("dnsgate.engine")

Ticket = list[Callable[[], None]]
"""``[callback]`` while the deadline is live, ``[]`` once cancelled or fired."""
SLACK: Final = 0.002
"""How late a deadline may fire rather than re-arming the loop timer (seconds)."""
TIMER_GRAIN: Final = 0.001
"""Added to every loop timer's delay (seconds): uvloop's timers are libuv's, in whole milliseconds from
a clock cached at the start of the loop iteration, so a loop timer may run up to ~0.6 ms before the
engine clock reaches its deadline. ``_fire`` then found nothing due and re-armed a timer of 0 ms, which
libuv ran again at once: a busy loop until the deadline. Measured in bench/micro_connection.py, ~30
empty fires per short TCP connection (bench/README.md, "CPU per connection"). One grain later, the
first fire finds its deadline due; with SLACK the loop timer is at most ~3 ms late."""
_heappush: Final = heapq.heappush  # compiled: C statics, not an attribute lookup on heapq per deadline
_heappop: Final = heapq.heappop
_heapify: Final = heapq.heapify
_COMPACT_MIN = 4096  # not Final: tests/unit/test_deadlines.py lowers it


class DeadlineQueue:
    """``add(deadline, callback) -> ticket``, ``cancel(ticket)``; callbacks run at or after their deadline."""

    __slots__ = ("_loop", "_clock", "_heap", "_sequence", "_timer", "_timer_at", "_cancelled", "errors")

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float]) -> None:
        self._loop = loop
        self._clock = clock  # the engine clock: deadlines are in its time
        self._heap: list[tuple[float, int, Ticket]] = []
        self._sequence = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._cancelled = 0
        self.errors = 0

    def __len__(self) -> int:
        """Live deadlines (cancelled ones still in the heap are not counted)."""
        return len(self._heap) - self._cancelled

    def add(self, deadline: float, callback: Callable[[], None]) -> Ticket:
        ticket: Ticket = [callback]
        _heappush(self._heap, (deadline, next(self._sequence), ticket))
        if deadline < self._timer_at - SLACK:
            self._arm(deadline)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        if ticket:
            ticket.clear()
            self._cancelled += 1
            heap = self._heap
            if self._cancelled > _COMPACT_MIN and self._cancelled * 2 > len(heap):
                self._heap = [entry for entry in heap if entry[2]]
                _heapify(self._heap)
                self._cancelled = 0

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        loop = self._loop
        # The engine clock may be offset from the loop's (the test harness moves it): schedule by delay.
        self._timer = loop.call_at(loop.time() + max(0.0, deadline - self._clock()) + TIMER_GRAIN, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        now = self._clock()
        heap = self._heap
        while heap and heap[0][0] <= now:
            ticket = _heappop(heap)[2]
            if not ticket:
                self._cancelled -= 1
                continue
            callback = ticket.pop()
            try:
                callback()
            except Exception:  # one connection's failure must not stop the others' timers
                self.errors += 1
                log.exception("deadline callback %r failed", callback)
        while heap and not heap[0][2]:
            _heappop(heap)
            self._cancelled -= 1
        if heap and heap[0][0] < self._timer_at - SLACK:  # (a callback may have armed it already)
            self._arm(heap[0][0])

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = float("inf")
        self._heap.clear()
        self._cancelled = 0
