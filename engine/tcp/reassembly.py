"""Out-of-order receive queue: holds data above ``rcv_nxt`` until the hole before it is filled.

Blocks are kept sorted and merged, keyed by unwrapped sequence numbers (see :mod:`engine.tcp.seq`). The
queue is bounded twice: the endpoint only offers data inside the window it advertised (so the bytes are
bounded by the receive buffer) and the number of separate blocks is capped (each block costs a list entry
and a SACK scan). A segment that would exceed the block cap is dropped *and not SACKed*, so the sender
retransmits it later; SACK must never report data we do not hold (RFC 2018 8).
"""

from __future__ import annotations

import bisect
from typing import Optional

__all__ = ["Reassembly"]


class Reassembly:
    __slots__ = ("_starts", "_blocks", "_max_blocks", "_latest", "bytes")

    def __init__(self, max_blocks: int) -> None:
        self._starts: list[int] = []  # block start sequence numbers, ascending
        self._blocks: list[bytearray] = []  # the data of each block
        self._max_blocks = max_blocks
        self._latest: Optional[int] = None  # start of the block that received the latest segment
        self.bytes = 0  # total bytes held

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __len__(self) -> int:
        return len(self._starts)

    def add(self, start: int, data: bytes | memoryview) -> bool:
        """Queue ``data`` at ``start``; overlapping blocks are merged. False if dropped (block cap)."""
        end = start + len(data)
        starts, blocks = self._starts, self._blocks
        # First block that ends at or after `start` (it may touch or overlap the new data).
        i = bisect.bisect_left(starts, start)
        if i > 0 and starts[i - 1] + len(blocks[i - 1]) >= start:
            i -= 1
        j = i
        while j < len(starts) and starts[j] <= end:
            j += 1
        if i == j:  # no neighbour touched: a new block
            if len(starts) >= self._max_blocks:
                return False
            starts.insert(i, start)
            blocks.insert(i, bytearray(data))
            self.bytes += end - start
            self._latest = start
            return True
        if j == i + 1 and starts[i] <= start:
            # The common case after a loss: the segment extends (or repeats) one block at its end. Grow
            # it in place instead of rebuilding it, so a long run behind a hole costs O(bytes), not O(n^2).
            block = blocks[i]
            block_end = starts[i] + len(block)
            if end > block_end:
                block += memoryview(data)[block_end - start :]
                self.bytes += end - block_end
            self._latest = starts[i]
            return True
        new_start = min(start, starts[i])
        new_end = max(end, starts[j - 1] + len(blocks[j - 1]))
        merged = bytearray(new_end - new_start)
        merged[start - new_start : end - new_start] = data
        old_bytes = 0
        for k in range(i, j):
            offset = starts[k] - new_start
            merged[offset : offset + len(blocks[k])] = blocks[k]
            old_bytes += len(blocks[k])
        starts[i:j] = [new_start]
        blocks[i:j] = [merged]
        self.bytes += len(merged) - old_bytes
        self._latest = new_start
        return True

    def pop_ready(self, rcv_nxt: int) -> Optional[bytes]:
        """If the first block starts at or below ``rcv_nxt``, remove it and return its bytes from
        ``rcv_nxt`` on (possibly empty when it was already fully covered); else None."""
        if not self._starts or self._starts[0] > rcv_nxt:
            return None
        start = self._starts.pop(0)
        block = self._blocks.pop(0)
        self.bytes -= len(block)
        if self._latest == start:
            self._latest = None
        skip = rcv_nxt - start
        if skip <= 0:
            return bytes(block)
        return bytes(memoryview(block)[skip:]) if skip < len(block) else b""

    def end(self) -> Optional[int]:
        """Sequence number after the highest byte held."""
        if not self._starts:
            return None
        return self._starts[-1] + len(self._blocks[-1])

    def sack_blocks(self, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` (start, end) blocks, the one holding the latest segment first (RFC 2018 4),
        then the others from the highest down."""
        result: list[tuple[int, int]] = []
        latest = self._latest
        if latest is not None:
            k = bisect.bisect_left(self._starts, latest)
            if k < len(self._starts) and self._starts[k] == latest:
                result.append((latest, latest + len(self._blocks[k])))
        for k in range(len(self._starts) - 1, -1, -1):
            if len(result) >= limit:
                break
            start = self._starts[k]
            if start != latest:
                result.append((start, start + len(self._blocks[k])))
        return result
