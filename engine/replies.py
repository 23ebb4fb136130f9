"""The engine's own answers to the device: TCP RST and ICMP/ICMPv6 unreachable, and their rate limit.

One home for what a firewall says when it refuses (docs/architecture.md): the pipeline refuses new flows
and repeats cached refusals through it, and plugins reach it through ``engine.reject``. Engine-generated
packets share one token bucket (``[engine] reject_rate`` per second), so a flood of blocked packets
degrades to silent drops (``rejects_degraded_to_drop``) instead of turning the engine into an amplifier.
RFC 9293 §3.10.7.1 decides the RST's numbers and forbids answering a RST; an ICMP error is never
answered with another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from engine.packet import PROTO_TCP, RST, Packet, build_icmp_unreachable, build_tcp_rst, is_icmp_error
from engine.stats import TokenBucket

if TYPE_CHECKING:
    from engine.decision import Decision
    from engine.stats import Stats

ICMP_CODES = {
    # reason: (ICMPv4 type-3 code, ICMPv6 type-1 code)
    "admin-prohibited": (13, 1),
    "port-unreachable": (3, 4),
    "host-unreachable": (1, 3),
    "net-unreachable": (0, 0),
}


class Replies:
    """Builds and writes the engine's refusals, rate limited."""

    __slots__ = ("_write", "_stats", "_bucket")

    def __init__(self, write: Callable[[bytes], None], stats: Stats, rate: int) -> None:
        self._write = write
        self._stats = stats
        self._bucket = TokenBucket(rate)

    def set_rate(self, rate: int) -> None:
        """A reload changed ``reject_rate``: a fresh bucket at the new rate."""
        self._bucket = TokenBucket(rate)

    def reject(self, packet: Packet, now: float, decision: Decision | None = None) -> None:
        """Answer a blocked packet like a firewall: TCP RST, else ICMP unreachable of the decision's kind."""
        if packet.proto == PROTO_TCP:
            self.rst(packet, now)
            return
        if is_icmp_error(packet):
            return
        counters = self._stats.counters
        if not self._bucket.take(now):
            counters["rejects_degraded_to_drop"] += 1
            return
        reason = decision.icmp if decision is not None else "admin-prohibited"
        v4_code, v6_code = ICMP_CODES[reason]
        try:
            reply = build_icmp_unreachable(packet, v4_code if packet.version == 4 else v6_code)
        except ValueError:
            return  # multicast/broadcast, a non-first fragment: no answer allowed
        counters["icmp_unreachable_sent"] += 1
        self._write(reply)

    def rst(self, packet: Packet, now: float) -> None:
        """A RST for a segment no connection takes (refused SYN, stray segment)."""
        if packet.tcp_flags & RST or packet.payload_offset == packet.l4_offset:
            return  # a RST is never answered; a non-first fragment has no header
        counters = self._stats.counters
        if not self._bucket.take(now):
            counters["rejects_degraded_to_drop"] += 1
            return
        counters["rst_sent"] += 1
        self._write(build_tcp_rst(packet))
