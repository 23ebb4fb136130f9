"""Unpredictable numbers for the protocol paths, from the OS CSPRNG, fetched in blocks.

TCP initial sequence numbers and timestamp offsets (RFC 6528, RFC 7323 §7.1) and the DNS ids the engine
puts on upstream queries (RFC 5452: an id an off-path attacker cannot guess) must come from a CSPRNG.
``os.urandom`` per value costs a ``getrandom`` system call each time; one call per 4 KB block serves
thousands of values instead. A forked child must never hand out the values its parent already holds
(two processes would then choose the same ISNs and DNS ids), so every pool forgets its block after a
fork (``os.register_at_fork``) — one module for that rule rather than a copy per protocol.

The hot paths may inline :meth:`RandomPool.next16`'s first step (dns_filter's UDP send does): the
attributes ``_block`` and ``_offset`` are that contract — a value is taken by reading
``_block[_offset:_offset + n]`` when ``_offset + n <= len(_block)`` and advancing ``_offset``.
"""

from __future__ import annotations

import os
import weakref

BLOCK_SIZE = 4096


class RandomPool:
    """16- and 32-bit values from one block of OS randomness at a time."""

    __slots__ = ("_block", "_offset", "__weakref__")

    def __init__(self) -> None:
        self._block = b""
        self._offset = 0
        _POOLS.add(self)

    def next16(self) -> int:
        offset = self._offset
        block = self._block
        if offset + 2 > len(block):
            block = self._block = os.urandom(BLOCK_SIZE)
            offset = 0
        self._offset = offset + 2
        return (block[offset] << 8) | block[offset + 1]

    def next32(self) -> int:
        offset = self._offset
        block = self._block
        if offset + 4 > len(block):
            block = self._block = os.urandom(BLOCK_SIZE)
            offset = 0
        self._offset = offset + 4
        return int.from_bytes(block[offset:offset + 4], "big")

    def discard(self) -> None:
        """Forget the unused values (a forked child must not reuse its parent's)."""
        self._block = b""
        self._offset = 0


_POOLS: weakref.WeakSet[RandomPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool.discard()


os.register_at_fork(after_in_child=_after_fork_in_child)
