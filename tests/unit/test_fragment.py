"""engine.fragment and the engine's writes: what is larger than the device's MTU leaves as IP fragments that
an independent implementation (scapy's defragmenter) puts back together into the original packet."""

from __future__ import annotations

import struct

import pytest
from scapy.all import raw
from scapy.layers.inet import IP, defragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, defragment6

from engine.fragment import Fragmenter, finish_checksum
from engine.packet import (
    PROTO_UDP,
    UDP_CSUM_OFFSET,
    VnetHeader,
    build_icmp_echo,
    build_udp,
    checksum,
    parse,
    pseudo_header_sum,
)
from engine.testing import PluginHarness, addr
from engine.udp_out import write_datagrams

SERVER, CLIENT = addr("198.51.100.10"), addr("10.0.0.2")
SERVER6, CLIENT6 = addr("2001:db8:100::10"), addr("fd00:db8::2")
PAYLOAD = bytes(range(256)) * 31 + b"tail"  # 7940 bytes


def test_ipv4_fragments_fit_the_mtu_and_carry_mf_offset_and_one_identification() -> None:
    whole = build_udp(SERVER, CLIENT, 7, 5000, PAYLOAD)
    fragments = Fragmenter(first_id=0x10001).split(whole, 1500)
    assert [len(f) for f in fragments] == [1500] * 5 + [len(whole) - 5 * 1480]
    for number, fragment in enumerate(fragments):
        ident, flags_offset = struct.unpack_from("!HH", fragment, 4)
        assert ident == 0x0001  # the low 16 bits of the counter
        assert flags_offset & 0x4000 == 0  # DF clear: these are fragments
        assert bool(flags_offset & 0x2000) == (number < 5)
        assert (flags_offset & 0x1FFF) * 8 == number * 1480
        assert checksum(fragment[:20]) == 0
        packet = parse(fragment)
        assert packet.is_fragment and packet.src == SERVER
    rebuilt = defragment([IP(f) for f in fragments])
    assert len(rebuilt) == 1 and raw(rebuilt[0])[20:] == whole[20:]


def test_ipv6_fragments_use_a_fragment_header_and_multiples_of_8() -> None:
    whole = build_udp(SERVER6, CLIENT6, 7, 5000, PAYLOAD)
    fragments = Fragmenter(first_id=0xDEADBEEF).split(whole, 1500)
    assert all(len(f) <= 1500 for f in fragments) and len(fragments) == 6
    for number, fragment in enumerate(fragments):
        assert fragment[6] == 44 and struct.unpack_from("!H", fragment, 4)[0] == len(fragment) - 40
        next_header, offset_m, ident = struct.unpack_from("!BxHI", fragment, 40)
        assert (next_header, ident) == (PROTO_UDP, 0xDEADBEEF)
        assert offset_m & ~7 == number * 1448 and bool(offset_m & 1) == (number < 5)
        assert number == 5 or (len(fragment) - 48) % 8 == 0
    rebuilt = defragment6([IPv6(f) for f in fragments])
    assert raw(rebuilt) == whole
    assert IPv6ExtHdrFragment not in IPv6(raw(rebuilt))


def test_the_minimum_ipv6_mtu_and_identifications_per_datagram() -> None:
    fragmenter = Fragmenter(first_id=0xFFFFFFFF)
    first = fragmenter.split(build_icmp_echo(SERVER6, CLIENT6, 1, 1, PAYLOAD, reply=True), 1280)
    second = fragmenter.split(build_icmp_echo(SERVER6, CLIENT6, 1, 2, PAYLOAD, reply=True), 1280)
    assert all(len(f) <= 1280 for f in first + second)
    assert struct.unpack_from("!I", first[0], 44)[0] == 0xFFFFFFFF
    assert struct.unpack_from("!I", second[0], 44)[0] == 0  # wraps
    assert Fragmenter(first_id=5).split(b"E" + bytes(30), 1500) == [b"E" + bytes(30)]  # fits: unchanged


def test_what_the_engine_never_builds_is_refused() -> None:
    whole = bytearray(build_udp(SERVER, CLIENT, 7, 5000, PAYLOAD))
    already = bytearray(whole)
    already[6] = 0x20  # MF
    with pytest.raises(ValueError, match="already"):
        Fragmenter().split(bytes(already), 1500)
    options = bytes([0x46]) + bytes(whole[1:20]) + b"\x01\x01\x01\x01" + bytes(whole[20:])
    with pytest.raises(ValueError, match="options"):
        Fragmenter().split(options, 1500)
    v6 = build_udp(SERVER6, CLIENT6, 7, 5000, PAYLOAD)
    hop_by_hop = (v6[:4] + struct.pack("!HB", len(v6) - 40 + 8, 0) + v6[7:40] + bytes([17, 0, 1, 4, 0, 0, 0, 0])
                  + v6[40:])
    with pytest.raises(ValueError, match="extension"):
        Fragmenter().split(hop_by_hop, 1500)
    with pytest.raises(ValueError, match="cannot carry"):
        Fragmenter().split(bytes(whole), 24)


def test_finish_checksum_completes_what_the_kernel_would() -> None:
    for src, dst, ip_len in ((SERVER, CLIENT, 20), (SERVER6, CLIENT6, 40)):
        partial = build_udp(src, dst, 7, 5000, PAYLOAD, partial_csum=True)
        assert finish_checksum(partial, VnetHeader.csum_only(ip_len, UDP_CSUM_OFFSET)) == build_udp(src, dst, 7, 5000, PAYLOAD)


def _reassembled(packets: list[bytes]) -> bytes:
    whole = defragment6([IPv6(p) for p in packets]) if packets[0][0] >> 4 == 6 else defragment([IP(p) for p in packets])[0]
    return raw(whole)


@pytest.mark.parametrize(("src", "dst"), [(SERVER, CLIENT), (SERVER6, CLIENT6)], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
def test_engine_writes_over_the_mtu_as_fragments_and_counts_them(src: bytes, dst: bytes, offload: bool) -> None:
    """Every write path: a complete packet (engine.write), a checksum-partial single packet
    (engine.write_gso without GSO), and udp_out's runs, which keep an oversized datagram out of GSO."""
    ip_len = 20 if len(src) == 4 else 40
    with PluginHarness("quic_block", offload=offload) as harness:
        engine = harness.engine
        echo = build_icmp_echo(src, dst, 9, 1, PAYLOAD, reply=True)
        engine.write(echo)
        icmp = harness.written
        assert len(icmp) == 6 and all(len(p) <= 1500 for p in icmp)
        assert _reassembled(icmp)[ip_len:] == echo[ip_len:]  # IPv4: the header's ID and DF differ
        counters = engine.stats.counters
        assert (counters["fragmentation.datagrams"], counters["fragmentation.fragments"]) == (1, 6)
        assert engine.stats.packets_down == 6

        harness.device.written.clear()
        harness.take_written()
        payloads = [PAYLOAD, PAYLOAD, b"small" * 200, b"small" * 200]
        write_datagrams(engine, src, dst, 7, 5000, payloads, None)
        written = harness.written
        assert all(len(p) <= 1500 for p in written)
        whole_datagrams = [p for p in written if not parse(p).is_fragment]
        fragments = [p for p in written if parse(p).is_fragment]
        assert len(whole_datagrams) == 2 and len(fragments) == 12
        for datagram in (_reassembled(fragments[:6]), _reassembled(fragments[6:])):
            packet = parse(datagram)
            assert bytes(packet.payload) == PAYLOAD
            segment = datagram[packet.l4_offset :]
            assert checksum(segment, pseudo_header_sum(src, dst, PROTO_UDP, len(segment))) == 0
        if offload:
            harness.device.written.clear()
            engine.write_gso(build_udp(src, dst, 7, 5000, PAYLOAD, partial_csum=True),
                             VnetHeader.csum_only(ip_len, UDP_CSUM_OFFSET))
            assert _reassembled(harness.device.written)[ip_len:] == build_udp(src, dst, 7, 5000, PAYLOAD)[ip_len:]


def test_a_flow_counts_a_fragmented_datagram_once() -> None:
    with PluginHarness("tests.unit.sample_plugins:Recorder") as harness:
        flow = harness.feed(build_udp(CLIENT, SERVER, 5000, 7, b"hi")).flow
        assert flow is not None
        reply = build_udp(SERVER, CLIENT, 7, 5000, PAYLOAD)
        harness.engine.write(reply, flow)
        assert (flow.packets_down, flow.bytes_down) == (1, len(reply))
        assert len(harness.device.written) == 6
