"""Encoding of the TCP options the endpoint sends, specialised for the hot path.

:func:`engine.packet.encode_tcp_options` is general; here the two layouts that go out on almost every
segment (timestamps alone, timestamps + SACK blocks) are a single ``struct.pack`` each. The layout is the one
Linux uses (NOPs so that every 32-bit value is aligned).
"""

from __future__ import annotations

import struct
from typing import Final, Optional, Sequence

__all__ = ["syn_ack_options", "ts_option", "sack_option", "TS_OPTION_LEN", "max_sack_blocks"]

TS_OPTION_LEN: Final = 12
_TS: Final = struct.Struct("!BBBBII")  # NOP NOP kind=8 len=10 TSval TSecr
_SACK_FORMATS: Final = [struct.Struct(f"!BBBB{2 * n}I") for n in range(5)]


def ts_option(tsval: int, tsecr: int) -> bytes:
    return _TS.pack(1, 1, 8, 10, tsval, tsecr)


def sack_option(blocks: Sequence[tuple[int, int]]) -> bytes:
    """NOP NOP SACK with up to 4 (wire-valued) blocks."""
    edges = [edge for block in blocks for edge in block]
    return _SACK_FORMATS[len(blocks)].pack(1, 1, 5, 2 + 4 * len(edges), *edges)


def max_sack_blocks(timestamps: bool) -> int:
    """How many SACK blocks fit next to the other options of a pure ACK (RFC 2018: 3 with timestamps)."""
    return 3 if timestamps else 4


def syn_ack_options(mss: int, wscale: Optional[int], sack_permitted: bool, timestamp: Optional[tuple[int, int]]) -> bytes:
    """MSS, SACK-permitted, timestamps and window scale for the SYN-ACK (only what the SYN offered)."""
    parts = [struct.pack("!BBH", 2, 4, mss)]
    if timestamp is not None:
        prefix = b"\x04\x02" if sack_permitted else b"\x01\x01"
        parts.append(prefix + struct.pack("!BBII", 8, 10, timestamp[0], timestamp[1]))
    elif sack_permitted:
        parts.append(b"\x01\x01\x04\x02")
    if wscale is not None:
        parts.append(struct.pack("!BBBB", 1, 3, 3, wscale))
    return b"".join(parts)
