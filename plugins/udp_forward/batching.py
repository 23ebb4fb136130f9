"""Group a burst of upstream datagrams into UDP GSO super-packets for the TUN; sans-IO.

With ``IFF_VNET_HDR`` a TUN accepts one ``GSO_UDP_L4`` write that the kernel cuts into ``gso_size``-byte
datagrams (REFERENCE: 40 x 1200 B in one write arrived as 40 correct datagrams), which saves a syscall and
a Python checksum per datagram. The kernel's rule is the one ``UDP_SEGMENT`` senders follow: every segment
has the same size except the last, which may be shorter. Datagrams read in one readiness callback usually
come from one sender burst (QUIC, RTP, iperf) and share a size, so runs are long in practice.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_GSO_SEGMENTS = 64
"""The kernel's ``UDP_MAX_SEGMENTS`` was 64 before 6.x raised it to 128; 64 is accepted everywhere."""


def plan_runs(sizes: Sequence[int], max_payload: int, max_segments: int = MAX_GSO_SEGMENTS) -> list[tuple[int, int]]:
    """Split datagram ``sizes`` (in arrival order) into runs ``(start, end)`` that may be one GSO write.

    A run is consecutive datagrams of one size ``s > 0`` optionally ended by one shorter datagram, at most
    ``max_segments`` long and at most ``max_payload`` bytes in total (the IP length field's limit). Order is
    kept: a datagram never overtakes another. Runs of length 1 are written as plain packets by the caller.
    """
    runs: list[tuple[int, int]] = []
    count = len(sizes)
    start = 0
    while start < count:
        size = sizes[start]
        end = start + 1
        total = size
        if size > 0:
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
