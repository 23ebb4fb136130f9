"""Sender-side SACK scoreboard: which bytes above ``snd_una`` the peer reports holding (RFC 2018/6675).

Ranges are unwrapped sequence numbers, sorted and merged. The endpoint uses it to skip SACKed bytes when
retransmitting and to find the holes to repair first. Bounded: beyond ``max_ranges`` the highest ranges are
forgotten (the peer repeats its blocks in every ACK, so the information comes back, and forgetting only makes
us retransmit more, never less).
"""

from __future__ import annotations

import bisect
from typing import Iterable, Optional

__all__ = ["Scoreboard"]


class Scoreboard:
    __slots__ = ("_starts", "_ends", "_max_ranges", "sacked")

    def __init__(self, max_ranges: int = 32) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._max_ranges = max_ranges
        self.sacked = 0  # bytes covered

    def __bool__(self) -> bool:
        return bool(self._starts)

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self.sacked = 0

    def highest(self) -> Optional[int]:
        """End of the highest SACKed range."""
        return self._ends[-1] if self._ends else None

    def add(self, blocks: Iterable[tuple[int, int]], snd_una: int, snd_max: int) -> None:
        """Merge (unwrapped) blocks; parts outside ``(snd_una, snd_max]`` are ignored (RFC 5961-ish sanity)."""
        for start, end in blocks:
            if start < snd_una:
                start = snd_una
            if end > snd_max:
                end = snd_max
            if end <= start:
                continue
            starts, ends = self._starts, self._ends
            i = bisect.bisect_left(ends, start)  # first range ending at/after start
            j = i
            while j < len(starts) and starts[j] <= end:
                j += 1
            if i < j:
                start = min(start, starts[i])
                end = max(end, ends[j - 1])
                self.sacked -= sum(ends[k] - starts[k] for k in range(i, j))
            starts[i:j] = [start]
            ends[i:j] = [end]
            self.sacked += end - start
            if len(starts) > self._max_ranges:
                self.sacked -= ends[-1] - starts[-1]
                del starts[-1], ends[-1]

    def advance(self, snd_una: int) -> None:
        """Forget everything below the new cumulative ACK."""
        starts, ends = self._starts, self._ends
        while starts and ends[0] <= snd_una:
            self.sacked -= ends[0] - starts[0]
            del starts[0], ends[0]
        if starts and starts[0] < snd_una:
            self.sacked -= snd_una - starts[0]
            starts[0] = snd_una

    def next_sacked(self, seq: int) -> Optional[tuple[int, int]]:
        """The first range ending after ``seq`` (it may contain ``seq``), or None."""
        i = bisect.bisect_right(self._ends, seq)
        if i < len(self._starts):
            return self._starts[i], self._ends[i]
        return None

    def next_hole(self, seq: int, limit: int) -> Optional[tuple[int, int]]:
        """The first un-SACKed run at or after ``seq`` that lies below the highest SACKed byte and below
        ``limit``: a byte range the peer has provably not received."""
        highest = self.highest()
        if highest is None:
            return None
        limit = min(limit, highest)
        while seq < limit:
            rng = self.next_sacked(seq)
            if rng is None:
                return None
            start, end = rng
            if start > seq:
                return seq, min(start, limit)
            seq = end
        return None
