"""Many connection deadlines behind one asyncio timer.

Why: each user-space TCP connection has a deadline (retransmission, tail-loss probe, keepalive,
TIME_WAIT) that moves as it runs. One ``loop.call_at`` per arming meant a ``TimerHandle`` object, a
cancellation, and heap operations that compare handles through a Python-level ``__lt__``: about three
armings and two firings per short HTTP/1.0 connection, a visible share of its cost. Here deadlines are
kept in millisecond slots, a cancelled ticket is just emptied, and a single loop timer is armed for the
earliest slot. TCP's timers do not need sub-millisecond precision (RTO >= 200 ms, probe >= 10 ms,
TIME_WAIT 1 s), so the loop timer is moved earlier only when a new deadline beats it by more than
:data:`SLACK`: under load, adding a deadline almost never touches the loop's own heap.

Why slots, not one heap of ``(time, sequence, ticket)`` tuples: a short connection adds four deadlines
(its SYN-ACK retransmission, a re-armed retransmission, TIME_WAIT and the upstream dial's 5 s limit)
and most are cancelled, so at 6,000 connections/s that heap held ~6,000 entries and every push and pop
walked ~13 levels of tuple comparisons: 5.5% of the engine's CPU in the http benchmark. A slot is one
``dict`` entry holding the tickets due in that millisecond; the heap holds only the distinct slot numbers
(plain ints), so it is pushed once per new millisecond and popped once per millisecond that comes due,
not once per deadline. Deadlines in the same millisecond fire in the order they were added.
"""

from __future__ import annotations

import asyncio
import heapq
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
SLOTS_PER_SECOND: Final = 1000
"""Slot width: one millisecond. A deadline ``d`` goes into slot ``int(d * 1000) + 1`` and that slot comes
due once ``int(now * 1000)`` reaches it, which implies ``now > d`` (both roundings are monotonic): a
callback never runs before its deadline and at most one slot after it."""
_SLACK_SLOTS: Final = 2  # SLACK in slots
_NEVER: Final = 1 << 60  # "no loop timer armed", as a slot number (under 2**62: a tagged int in the compiled build)
_heappush: Final = heapq.heappush  # compiled: C statics, not an attribute lookup on heapq per deadline
_heappop: Final = heapq.heappop
_heapify: Final = heapq.heapify
_COMPACT_MIN = 4096  # not Final: tests/unit/test_deadlines.py lowers it


class DeadlineQueue:
    """``add(deadline, callback) -> ticket``, ``cancel(ticket)``; callbacks run at or after their deadline."""

    __slots__ = ("_loop", "_clock", "_slots", "_slot_heap", "_stored", "_timer", "_timer_slot", "_cancelled",
                 "_firing", "errors")

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float]) -> None:
        self._loop = loop
        self._clock = clock  # the engine clock: deadlines are in its time
        self._slots: dict[int, list[Ticket]] = {}  # slot -> its tickets, in the order they were added
        self._slot_heap: list[int] = []  # the keys of _slots, as a heap
        self._stored = 0  # tickets held in _slots, live or cancelled
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot = _NEVER
        self._cancelled = 0  # cancelled tickets still held in _slots
        self._firing = False
        self.errors = 0

    def __len__(self) -> int:
        """Live deadlines (cancelled ones still held are not counted)."""
        return self._stored - self._cancelled

    def add(self, deadline: float, callback: Callable[[], None]) -> Ticket:
        ticket: Ticket = [callback]
        slot = int(deadline * SLOTS_PER_SECOND) + 1
        tickets = self._slots.get(slot)
        if tickets is None:
            self._slots[slot] = [ticket]
            _heappush(self._slot_heap, slot)
        else:
            tickets.append(ticket)
        self._stored += 1
        if slot < self._timer_slot - _SLACK_SLOTS:
            self._arm(slot)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        if ticket:
            ticket.clear()
            self._cancelled += 1
            if self._cancelled > _COMPACT_MIN and self._cancelled * 2 > self._stored and not self._firing:
                self._compact()

    def _compact(self) -> None:
        """Drop the cancelled tickets (a dial's 5 s limit is nearly always cancelled, and would otherwise be
        held for those 5 s) and the slots left empty."""
        slots: dict[int, list[Ticket]] = {}
        stored = 0
        for slot, tickets in self._slots.items():
            live = [ticket for ticket in tickets if ticket]
            if live:
                slots[slot] = live
                stored += len(live)
        self._slots = slots
        self._slot_heap = list(slots)
        _heapify(self._slot_heap)
        self._stored = stored
        self._cancelled = 0

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_slot = slot
        loop = self._loop
        # The engine clock may be offset from the loop's (the test harness moves it): schedule by delay.
        delay = max(0.0, slot / SLOTS_PER_SECOND - self._clock())
        self._timer = loop.call_at(loop.time() + delay + TIMER_GRAIN, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_slot = _NEVER
        due = int(self._clock() * SLOTS_PER_SECOND)
        heap = self._slot_heap
        slots = self._slots
        self._firing = True  # no compaction while a slot's list is out of _slots
        try:
            while heap and heap[0] <= due:
                for ticket in slots.pop(_heappop(heap)):
                    self._stored -= 1  # one at a time: a callback may cancel a ticket further on
                    if not ticket:
                        self._cancelled -= 1
                        continue
                    callback = ticket.pop()
                    try:
                        callback()
                    except Exception:  # one connection's failure must not stop the others' timers
                        self.errors += 1
                        log.exception("deadline callback %r failed", callback)
        finally:
            self._firing = False
        if heap and heap[0] < self._timer_slot - _SLACK_SLOTS:  # (a callback may have armed it already)
            self._arm(heap[0])

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_slot = _NEVER
        self._slots.clear()
        self._slot_heap.clear()
        self._stored = 0
        self._cancelled = 0
