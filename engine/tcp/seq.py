"""Sequence-number arithmetic modulo 2**32 (RFC 9293 3.4).

The endpoint keeps its sequence variables *unwrapped*: plain Python ints that grow without bound, so
comparisons inside the state machine are ordinary ``<``. Wire values are reduced with :func:`wire` when a
segment is built and lifted back with :func:`unwrap` (the nearest value to a known reference, i.e. the
RFC 1982 serial-number interpretation) when a segment arrives. This keeps every modulo-2**32 step at the
boundary instead of in each comparison of the hot path.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MOD", "MASK", "HALF", "wire", "unwrap", "seq_lt", "seq_diff"]

MOD: Final = 1 << 32
MASK: Final = MOD - 1
HALF: Final = 1 << 31


def wire(value: int) -> int:
    """The 32-bit on-the-wire form of an unwrapped sequence number."""
    return value & MASK


def unwrap(value: int, reference: int) -> int:
    """The unwrapped number congruent to 32-bit ``value`` that is nearest to unwrapped ``reference``."""
    delta = (value - reference) & MASK
    if delta >= HALF:
        delta -= MOD
    return reference + delta


def seq_diff(a: int, b: int) -> int:
    """Signed distance ``a - b`` between two 32-bit sequence numbers, in ``[-2**31, 2**31)``."""
    delta = (a - b) & MASK
    return delta - MOD if delta >= HALF else delta


def seq_lt(a: int, b: int) -> bool:
    """``a < b`` in 32-bit serial-number order."""
    return seq_diff(a, b) < 0
