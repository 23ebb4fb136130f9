"""udp_forward with datagrams larger than the device's MTU, against a real UDP server on loopback: the
client's fragments are reassembled and sent upstream as one datagram, and the server's large reply comes
back to the device as IP fragments (with and without offloads)."""

from __future__ import annotations

import socket

import pytest
from scapy.all import raw
from scapy.layers.inet import IP, defragment
from scapy.layers.inet6 import IPv6, defragment6

from engine.fragment import Fragmenter
from engine.packet import PROTO_UDP, checksum, parse, pseudo_header_sum
from engine.testing import PluginHarness, addr, udp

LOOPBACK = {"allow_loopback": True}


def reassembled(packets: list[bytes]) -> bytes:
    if packets[0][0] >> 4 == 6:
        return raw(defragment6([IPv6(p) for p in packets]))
    [whole] = defragment([IP(p) for p in packets])
    return raw(whole)


@pytest.mark.parametrize(("family", "host", "client"),
                         [(socket.AF_INET, "127.0.0.1", "10.0.0.2"), (socket.AF_INET6, "::1", "fd00:db8::2")],
                         ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
def test_an_8_kb_datagram_round_trips_in_fragments(family: socket.AddressFamily, host: str, client: str,
                                                    offload: bool) -> None:
    server = socket.socket(family, socket.SOCK_DGRAM)
    server.bind((host, 0))
    server.settimeout(2.0)
    port = server.getsockname()[1]
    request = bytes(range(256)) * 31 + b"8k"
    try:
        with PluginHarness("udp_forward", engine=LOOPBACK, offload=offload) as harness:
            for piece in Fragmenter(first_id=42).split(udp(client, 40000, host, port, request), 1500):
                harness.feed(piece)
            data, peer = server.recvfrom(65535)
            assert data == request  # one datagram upstream, not pieces
            server.sendto(data[::-1], peer)
            assert harness.run_until(lambda: len(harness.device.written) >= 6)
            written = harness.written
            assert len(written) == 6 and all(len(p) <= 1500 for p in written)
            whole = parse(reassembled(written))
            assert (whole.src, whole.sport, whole.dst, whole.dport) == (addr(host), port, addr(client), 40000)
            assert bytes(whole.payload) == request[::-1]
            segment = bytes(whole.buf[whole.l4_offset:])
            assert checksum(segment, pseudo_header_sum(whole.src, whole.dst, PROTO_UDP, len(segment))) == 0
            counters = harness.engine.stats.counters
            assert counters["reassembly.reassembled"] == 1 and counters["fragmentation.fragments"] == 6
            assert counters["udp_forward.fragments_dropped"] == 0
    finally:
        server.close()
