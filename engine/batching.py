"""Write coalescing at I/O batch boundaries.

Why: a syscall per packet is most of what a DNS query or a small datagram costs the engine. When a
readiness callback drains many packets at once (the TUN read loop, an upstream socket's read loop),
the writes they cause can often be merged: replies of one client flow into one UDP GSO write, queries
to one upstream socket into one ``UDP_SEGMENT`` send. A writer that can merge queues its output and
asks to be flushed when the batch ends; the code that owns the read loop brackets it with
:meth:`WriteBatch.begin` / :meth:`WriteBatch.end`. Outside a batch (a timer, a test feeding packets
one by one) :attr:`WriteBatch.active` is false and writers write at once, so nothing waits for a
flush that never comes and an idle packet pays no extra latency: the flush runs in the same loop
iteration, right after the read loop that produced the work.
"""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger("dnsgate.engine")

Flush = Callable[[], None]


class WriteBatch:
    """Nested batch scopes and the flush callbacks queued inside them (each runs once per batch)."""

    __slots__ = ("_depth", "_flushes", "errors", "active")

    def __init__(self) -> None:
        self._depth = 0
        self._flushes: dict[Flush, None] = {}
        self.errors = 0
        #: True inside a batch: queue the write and :meth:`defer` its flush instead of writing now. A plain
        #: attribute kept by begin/end (not a property): writers read it for every packet.
        self.active = False

    def begin(self) -> None:
        self._depth += 1
        self.active = True

    def end(self) -> None:
        """Close one scope; the outermost runs every queued flush (also those queued by flushes)."""
        depth = self._depth - 1
        if depth > 0:
            self._depth = depth
            return
        flushes = self._flushes
        try:
            while flushes:
                queued = list(flushes)
                flushes.clear()
                for flush in queued:
                    try:
                        flush()
                    except Exception:  # one writer's bug must not strand the others' output
                        self.errors += 1
                        log.exception("batch flush %r failed", flush)
        finally:
            self._depth = 0
            self.active = False

    def defer(self, flush: Flush) -> None:
        """Run ``flush`` when the current batch ends (once, however often it is deferred)."""
        self._flushes[flush] = None
