"""Writing UDP datagrams of one flow to the device, as few writes as the device allows.

With ``IFF_VNET_HDR`` and offloads a TUN accepts one ``GSO_UDP_L4`` write that the kernel cuts into
``gso_size``-byte datagrams (docs/architecture.md §10: 40 x 1200 B in one write arrived as 40 correct datagrams): one
syscall and no Python checksum for a whole run instead of one syscall and one checksum per datagram. The
kernel's rule is the one ``UDP_SEGMENT`` senders follow: every segment has the same size except the last,
which may be shorter. Datagrams that become ready together usually come from one burst (QUIC, RTP, iperf
from an upstream; DNS replies under load, which share a size when their names do), so runs are long in
practice. udp_forward (upstream datagrams) and dns_filter (replies) both write through here.

A datagram larger than the device's MTU never joins a run (GSO would cut the run into datagrams of that
size, each still too big for the link): it is built with its checksum complete and written alone, and
``Engine.write`` sends it as IP fragments (engine/fragment.py).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence
from typing import Final, TYPE_CHECKING

from engine.packet import UDP_CSUM_OFFSET, Buffer, VnetHeader, build_udp

if TYPE_CHECKING:
    from engine.flow import Flow
    from engine.runtime import Engine

MAX_GSO_SEGMENTS: Final = 64
"""The kernel's ``UDP_MAX_SEGMENTS`` was 64 before 6.x raised it to 128; 64 is accepted everywhere."""

SOL_UDP: Final = 17
UDP_SEGMENT: Final = 103
"""``sendmsg`` control message level and type of UDP GSO (linux/udp.h; Python 3.11's socket lacks them)."""
_U16: Final = struct.Struct("=H")  # control message data is a native u16

GSO_REFUSED: Final = frozenset((errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE))
"""errnos of a ``UDP_SEGMENT`` send the path cannot do (no UDP GSO there): fall back to one send each."""


def send_segmented(sock: socket.socket, payload: Buffer, gso_size: int) -> None:
    """Send ``payload`` on a connected UDP socket as ``gso_size``-byte datagrams (the last may be shorter)
    in one ``sendmsg``: the kernel cuts it. Raises what ``sendmsg`` raises; an errno in
    :data:`GSO_REFUSED` means "this path cannot segment", anything else is the socket's own error."""
    sock.sendmsg([payload], [(SOL_UDP, UDP_SEGMENT, _U16.pack(gso_size))])


def plan_runs(
    sizes: Sequence[int], max_payload: int, max_segments: int = MAX_GSO_SEGMENTS, max_size: int = 0xFFFF
) -> list[tuple[int, int]]:
    """Split datagram ``sizes`` (in arrival order) into runs ``(start, end)`` that may be one GSO write.

    A run is consecutive datagrams of one size ``0 < s <= max_size`` optionally ended by one shorter
    datagram, at most ``max_segments`` long and at most ``max_payload`` bytes in total (the IP length
    field's limit). Order is kept: a datagram never overtakes another. Runs of length 1 are written as plain
    packets by the caller (a datagram over ``max_size``, what one packet on the link carries, always is).
    """
    runs: list[tuple[int, int]] = []
    count = len(sizes)
    start = 0
    while start < count:
        size = sizes[start]
        end = start + 1
        total = size
        if 0 < size <= max_size:
            while end < count and end - start < max_segments:
                nxt = sizes[end]
                if nxt > size or nxt == 0 or total + nxt > max_payload:
                    break
                total += nxt
                end += 1
                if nxt < size:
                    break  # a shorter datagram can only end a run
        runs.append((start, end))
        start = end
    return runs


def write_datagrams(
    engine: Engine, src: bytes, dst: bytes, sport: int, dport: int, payloads: Sequence[bytes], flow: Flow | None
) -> int:
    """Write ``payloads`` as UDP datagrams ``src:sport -> dst:dport``, in order; returns the GSO writes made.

    Without offloads every datagram is a complete packet (checksums computed here). With offloads the
    kernel completes checksums (a single datagram goes with ``NEEDS_CSUM``) and segments each run. Either
    way a datagram over the MTU leaves complete, as fragments.
    """
    write = engine.output.write
    if not engine.offload:
        for payload in payloads:
            write(build_udp(src, dst, sport, dport, payload), flow)
        return 0
    ip_len = 20 if len(src) == 4 else 40
    fits = engine.mtu - ip_len - 8  # the largest payload one packet on the link carries
    write_gso = engine.output.write_gso
    single = VnetHeader.csum_only(ip_len, UDP_CSUM_OFFSET)
    if len(payloads) == 1:
        payload = payloads[0]
        if len(payload) > fits:
            write(build_udp(src, dst, sport, dport, payload), flow)
        else:
            write_gso(build_udp(src, dst, sport, dport, payload, partial_csum=True), single, flow)
        return 0
    sizes = [len(payload) for payload in payloads]
    gso_writes = 0
    for start, end in plan_runs(sizes, 65535 - ip_len - 8 if ip_len == 20 else 65535 - 8, max_size=fits):
        if end - start == 1:
            if sizes[start] > fits:
                write(build_udp(src, dst, sport, dport, payloads[start]), flow)
            else:
                write_gso(build_udp(src, dst, sport, dport, payloads[start], partial_csum=True), single, flow)
        else:
            body = b"".join(payloads[start:end])
            write_gso(build_udp(src, dst, sport, dport, body, partial_csum=True),
                      VnetHeader.for_udp(ip_len, sizes[start]), flow)
            gso_writes += 1
    return gso_writes
