"""Reassembly of IP fragments from the device: IPv4 (RFC 791) and IPv6 with a fragment header (RFC 8200 4.5).

Why the engine reassembles: a Linux client sending a UDP datagram or a ping larger than the TUN's MTU hands
over fragments, and only the first carries the ports. A flow cannot be judged, nor its handler fed, from
pieces; gVisor-based peers reassemble for the same reason. The whole datagram then goes through the normal
pipeline as one packet, so the flow lookup and the fast path see its real ports.

Sans-IO: :meth:`Reassembler.add` takes a parsed fragment and ``now`` and returns the complete datagram
(a new IP packet without fragment fields) or ``None``; nothing here reads a clock or does I/O. Counters go
into the mapping given at construction (the engine's ``stats.counters``), prefixed ``reassembly.``.

Rules, the strict reading of the RFCs because the device is local and has no reason to send anything odd:

* keyed by ``(src, dst, protocol, identification)``; for IPv6 the protocol is the fragment header's next
  header and the identification its 32 bits;
* any overlap discards the whole datagram, and fragments of it that arrive later until its timeout (RFC
  5722; the same for IPv4, where overlaps are the classic way to slip past a filter). An exact duplicate
  (same offset, same bytes) is tolerated and ignored, as RFC 8200 4.5 allows;
* a fragment that cannot belong to a valid datagram is dropped: no data, a non-last fragment whose length
  is not a multiple of 8, or an end beyond 65,535 bytes (IPv4 total length; IPv6 payload length). One that
  contradicts what the datagram already has (a second, different last fragment, data beyond the end)
  discards the datagram;
* bounded: at most ``max_datagrams`` in progress and ``max_bytes`` of fragment data held; beyond either the
  oldest datagram is evicted. A datagram not complete ``timeout`` seconds after its first fragment is
  given up (RFC 8200 suggests 60 s, Linux 30 s; a local device sends all fragments within microseconds,
  so a few seconds only bound the memory a lost fragment pins).
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import MutableMapping
from typing import Final, Optional

from engine.packet import Packet, PacketError, checksum, fragment_fields

MAX_IPV4_TOTAL: Final = 0xFFFF
MAX_IPV6_PAYLOAD: Final = 0xFFFF
_U16: Final = struct.Struct("!H")

FragmentKey = tuple[bytes, bytes, int, int]
"""``(src, dst, protocol, identification)``."""


class _Datagram:
    """One datagram in progress: its pieces sorted by offset, never overlapping."""

    __slots__ = ("deadline", "starts", "pieces", "held", "end", "header", "next_header", "next_header_at",
                 "discarded")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.starts: list[int] = []
        self.pieces: list[bytes] = []
        self.held = 0
        self.end: Optional[int] = None
        """The datagram's data length, known once the last fragment (MF/M clear) arrived."""
        self.header = b""
        """The offset-0 fragment's IPv4 header or IPv6 unfragmentable part, once it arrived."""
        self.next_header = 0
        self.next_header_at = 0
        self.discarded = False
        """Refused (overlap, contradiction): later fragments are dropped until the deadline."""


class Reassembler:
    """Fragments in, whole datagrams out, within a memory bound.

    ``max_datagrams = 0`` turns reassembly off (:attr:`enabled` is false; the pipeline then drops fragments
    as it did before reassembly existed).
    """

    def __init__(
        self,
        counters: MutableMapping[str, int],
        timeout: float = 3.0,
        max_bytes: int = 4 << 20,
        max_datagrams: int = 1024,
    ) -> None:
        self.counters = counters
        self._pending: dict[FragmentKey, _Datagram] = {}  # insertion order = age
        self.held = 0
        """Bytes of fragment data held over every datagram in progress."""
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_datagrams = max_datagrams

    def configure(self, timeout: float, max_bytes: int, max_datagrams: int) -> None:
        """New limits (a profile reload): what is beyond them is evicted now. A new timeout applies to
        datagrams that start from now on."""
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_datagrams = max_datagrams
        while self._pending and (len(self._pending) > max_datagrams or self.held > max_bytes):
            self._evict_oldest()

    @property
    def enabled(self) -> bool:
        return self.max_datagrams > 0

    def __len__(self) -> int:
        return len(self._pending)

    def _count(self, name: str, n: int = 1) -> None:
        key = f"reassembly.{name}"
        self.counters[key] = self.counters.get(key, 0) + n

    # -- the one entry point ---------------------------------------------------------------------

    def add(self, packet: Packet, now: float) -> Optional[bytes]:
        """Take one fragment (a packet :func:`~engine.packet.parse` found ``is_fragment``). Returns the
        reassembled IP packet when this fragment completed it, else ``None``. Never raises for any
        input: what cannot be used is counted and dropped."""
        self.expire(now)
        if not self.enabled:
            return None
        try:
            frag = fragment_fields(packet)
        except PacketError:
            self._count("invalid")
            return None
        buf = packet.buf
        size = len(buf) - frag.data_offset
        start = frag.offset
        end = start + size
        limit = MAX_IPV4_TOTAL - frag.header_len if packet.version == 4 else MAX_IPV6_PAYLOAD - (frag.header_len - 40)
        if size <= 0 or (frag.more and size & 7) or end > limit:
            self._count("invalid")
            return None
        key = (packet.src, packet.dst, frag.next_header, frag.ident)
        datagram = self._pending.get(key)
        if datagram is None:
            if len(self._pending) >= self.max_datagrams:
                self._evict_oldest()
            datagram = self._pending[key] = _Datagram(now + self.timeout)
        elif datagram.discarded:
            self._count("discarded_fragments")
            return None
        self._count("fragments")

        # What the datagram already knows about its end must agree with this fragment.
        known_end = datagram.end
        if frag.more:
            if known_end is not None and end >= known_end:
                self._discard(datagram, "invalid")
                return None
        elif known_end is not None and known_end != end or (
            known_end is None and datagram.pieces and datagram.starts[-1] + len(datagram.pieces[-1]) > end
        ):
            self._discard(datagram, "invalid")
            return None

        # Overlaps (RFC 5722): with the piece starting at or before ours, or the one after it.
        starts, pieces = datagram.starts, datagram.pieces
        index = bisect.bisect_right(starts, start)
        if index and starts[index - 1] + len(pieces[index - 1]) > start:
            # An exact duplicate: same offset, same bytes, and the same "last or not" (a last fragment
            # sets the end, and the end checks above have held a non-last one to it).
            if starts[index - 1] == start and (frag.more or known_end is not None) and (
                pieces[index - 1] == buf[frag.data_offset :]
            ):
                self._count("duplicates")
                return None
            self._discard(datagram, "overlapping")
            return None
        if index < len(starts) and starts[index] < end:
            self._discard(datagram, "overlapping")
            return None

        starts.insert(index, start)
        pieces.insert(index, bytes(buf[frag.data_offset :]))  # the device's read buffer is reused
        datagram.held += size
        self.held += size
        if not frag.more:
            datagram.end = end
        if start == 0:
            datagram.header = bytes(buf[: frag.header_len])
            datagram.next_header = frag.next_header
            datagram.next_header_at = frag.next_header_at
        while self.held > self.max_bytes:
            oldest = next(iter(self._pending.values()))
            self._evict_oldest()
            if oldest is datagram:
                return None
        return self._complete(key, datagram)

    def expire(self, now: float) -> int:
        """Give up datagrams whose timeout passed (the engine also calls this from its tick). Returns how
        many incomplete datagrams timed out."""
        pending = self._pending
        timed_out = 0
        while pending:
            key, oldest = next(iter(pending.items()))
            if oldest.deadline > now:
                break
            del pending[key]
            self.held -= oldest.held
            if not oldest.discarded:
                timed_out += 1
        if timed_out:
            self._count("timed_out", timed_out)
        return timed_out

    # -- helpers ---------------------------------------------------------------------------------

    def _complete(self, key: FragmentKey, datagram: _Datagram) -> Optional[bytes]:
        end = datagram.end
        if end is None or not datagram.header or datagram.held != end:
            return None  # pieces never overlap, so held == end means no hole is left
        header = bytearray(datagram.header)
        v4 = header[0] >> 4 == 4
        if (len(header) if v4 else len(header) - 40) + end > (MAX_IPV4_TOTAL if v4 else MAX_IPV6_PAYLOAD):
            self._discard(datagram, "invalid")  # the offset-0 fragment's header made it too long
            return None
        del self._pending[key]
        self.held -= datagram.held
        if v4:
            header[2:4] = _U16.pack(len(header) + end)
            header[6:8] = b"\0\0"  # no longer a fragment (DF cannot have been set on one)
            header[10:12] = b"\0\0"
            header[10:12] = _U16.pack(checksum(header))
        else:
            header[4:6] = _U16.pack(len(header) - 40 + end)
            header[datagram.next_header_at] = datagram.next_header  # the fragment header is gone (RFC 8200 4.5)
        self._count("reassembled")
        return b"".join((header, *datagram.pieces))

    def _discard(self, datagram: _Datagram, reason: str) -> None:
        """Refuse the whole datagram; it stays (empty) until its deadline so its later fragments are
        dropped too (RFC 5722: "including those not yet received")."""
        datagram.discarded = True
        self.held -= datagram.held
        datagram.held = 0
        datagram.starts = []
        datagram.pieces = []
        self._count(reason)

    def _evict_oldest(self) -> None:
        key, oldest = next(iter(self._pending.items()))
        del self._pending[key]
        self.held -= oldest.held
        if not oldest.discarded:
            self._count("evicted")
