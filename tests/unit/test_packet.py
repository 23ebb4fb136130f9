"""Unit tests for engine.packet: hand-made packets with known bytes, edge cases, reject builders.

scapy-driven property tests live in test_packet_scapy.py; random-bytes robustness in tests/fuzz.
"""

from __future__ import annotations

import struct

import pytest

from engine import packet as P
from engine.packet import PacketError, parse

V4_A = bytes([10, 0, 0, 2])
V4_B = bytes([192, 0, 2, 1])
V6_A = bytes.fromhex("fd000db8000000000000000000000002")
V6_B = bytes.fromhex("20010db8000000000000000000000001")


def ones_sum_ok(data: bytes, initial: int = 0) -> bool:
    """A message with a correct checksum sums to 0xFFFF (naive word loop, independent of the module)."""
    if len(data) % 2:
        data += b"\0"
    s = initial
    for (w,) in struct.iter_unpack("!H", data):
        s += w
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s == 0xFFFF


def naive_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(w for (w,) in struct.iter_unpack("!H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> int:
    if len(src) == 4:
        return sum(struct.unpack("!4H", src + dst)) + proto + length
    return sum(struct.unpack("!16H", src + dst)) + (length >> 16) + (length & 0xFFFF) + proto


def l4_ok(raw: bytes) -> bool:
    pkt = parse(raw)
    l4 = bytes(pkt.buf[pkt.l4_offset :])
    if pkt.proto == P.PROTO_ICMP:
        return ones_sum_ok(l4)
    return ones_sum_ok(l4, pseudo(pkt.src, pkt.dst, pkt.proto, len(l4)))


# --- checksum ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 2, 3, 20, 41, 1500, 4095, 4096, 4097, 9001, 65535])
def test_checksum_matches_naive(size: int) -> None:
    data = bytes((i * 7 + 3) & 0xFF for i in range(size))
    assert P.checksum(data) == naive_checksum(data)
    assert P.checksum(memoryview(data)) == naive_checksum(data)
    assert P.checksum(bytearray(data)) == naive_checksum(data)


def test_checksum_all_ones_and_zeros() -> None:
    assert P.checksum(b"\xff" * 10000) == naive_checksum(b"\xff" * 10000) == 0
    assert P.checksum(b"\0" * 10000) == 0xFFFF
    assert P.checksum(b"") == 0xFFFF


def test_checksum_rfc1071_example() -> None:
    # RFC 1071 section 3: bytes 00 01 f2 03 f4 f5 f6 f7 sum to ddf2.
    assert P.checksum(bytes.fromhex("0001f203f4f5f6f7")) == ~0xDDF2 & 0xFFFF


def test_pseudo_header_sum_folds() -> None:
    s = P.pseudo_header_sum(V6_A, V6_B, P.PROTO_TCP, 70000)
    raw = pseudo(V6_A, V6_B, P.PROTO_TCP, 70000)
    while raw >> 16:
        raw = (raw & 0xFFFF) + (raw >> 16)
    assert s == raw and 0 < s <= 0xFFFF


# --- parse ------------------------------------------------------------------------------------------------


def test_parse_built_tcp_v4() -> None:
    opts = P.encode_tcp_options(mss=1460, wscale=7, sack_permitted=True, timestamp=(11, 22))
    raw = P.build_tcp(V4_A, V4_B, 40000, 443, 1000, 2000, P.SYN | P.ACK, 65535, opts, b"hello", ttl=33)
    pkt = parse(raw + b"\0\0\0")  # link-layer padding is cut off
    assert len(pkt.buf) == len(raw)
    assert (pkt.version, pkt.src, pkt.dst, pkt.proto, pkt.ttl) == (4, V4_A, V4_B, P.PROTO_TCP, 33)
    assert (pkt.sport, pkt.dport, pkt.seq, pkt.ack, pkt.tcp_flags, pkt.window) == (
        40000, 443, 1000, 2000, P.SYN | P.ACK, 65535,
    )
    assert pkt.l4_offset == 20 and pkt.payload_offset == 20 + 20 + len(opts)
    assert bytes(pkt.payload) == b"hello" and pkt.payload_len == 5
    assert pkt.flow_key == (P.PROTO_TCP, V4_A, 40000, V4_B, 443)
    assert str(pkt.src_ip) == "10.0.0.2" and str(pkt.dst_ip) == "192.0.2.1"
    assert not pkt.is_fragment
    o = pkt.tcp_options()
    assert (o.mss, o.wscale, o.sack_permitted, o.sack_blocks, o.timestamp) == (1460, 7, True, (), (11, 22))
    assert l4_ok(raw)
    assert P.checksum(raw[:20]) == 0  # valid IPv4 header checksum


def test_parse_built_udp_v6() -> None:
    raw = P.build_udp(V6_A, V6_B, 5353, 53, b"\x12\x34query")
    pkt = parse(raw)
    assert (pkt.version, pkt.proto, pkt.sport, pkt.dport) == (6, P.PROTO_UDP, 5353, 53)
    assert bytes(pkt.payload) == b"\x12\x34query"
    assert pkt.src == V6_A and pkt.dst == V6_B
    assert l4_ok(raw)


def test_parse_accepts_memoryview_of_larger_buffer() -> None:
    raw = P.build_udp(V4_A, V4_B, 1, 2, b"x" * 100)
    buf = bytearray(65536)
    buf[: len(raw)] = raw
    pkt = parse(memoryview(buf)[: len(raw) + 50])
    assert len(pkt.buf) == len(raw)
    assert pkt.buf.obj is buf  # zero-copy: a view of the caller's buffer


def test_ipv4_options_are_skipped() -> None:
    raw = bytearray(P.build_udp(V4_A, V4_B, 1000, 2000, b"data"))
    opts = b"\x94\x04\x00\x00"  # router alert
    raw = bytearray(raw[:20] + opts + raw[20:])
    raw[0] = 0x46
    struct.pack_into("!H", raw, 2, len(raw))
    pkt = parse(bytes(raw))
    assert pkt.l4_offset == 24 and (pkt.sport, pkt.dport) == (1000, 2000)
    assert bytes(pkt.payload) == b"data"


def test_udp_length_shorter_than_ip_payload_trims() -> None:
    raw = bytearray(P.build_udp(V4_A, V4_B, 1, 2, b"abcdef"))
    struct.pack_into("!H", raw, 24, 8 + 3)
    assert bytes(parse(bytes(raw)).payload) == b"abc"


def v6_with_ext(chain: list[tuple[int, bytes]], upper: bytes, upper_proto: int) -> bytes:
    """IPv6 header + extension headers (kind, body incl. its 2 leading bytes placeholder) + upper layer."""
    parts = []
    for i, (kind, body) in enumerate(chain):
        nxt = chain[i + 1][0] if i + 1 < len(chain) else upper_proto
        parts.append(bytes([nxt]) + body[1:])
    payload = b"".join(parts) + upper
    first = chain[0][0] if chain else upper_proto
    return P.build_ipv6_header(V6_A, V6_B, first, len(payload)) + payload


def test_ipv6_extension_headers_are_skipped() -> None:
    udp = P.build_udp(V6_A, V6_B, 7, 9, b"zz")[40:]
    hop = b"\0\0" + b"\x01\x04\0\0\0\0"  # 8 bytes, PadN
    dest = b"\0\x01" + bytes(14)  # 16 bytes
    routing = b"\0\0\0\0" + bytes(4)  # 8 bytes, segments left 0
    frag_atomic = b"\0\0\0\0\0\0\0\x01"  # offset 0, M 0: atomic, not a fragment
    raw = v6_with_ext([(0, hop), (60, dest), (43, routing), (44, frag_atomic)], udp, P.PROTO_UDP)
    pkt = parse(raw)
    assert pkt.proto == P.PROTO_UDP and pkt.l4_offset == 40 + 8 + 16 + 8 + 8
    assert (pkt.sport, pkt.dport, bytes(pkt.payload)) == (7, 9, b"zz")
    assert not pkt.is_fragment


def test_ipv6_fragments() -> None:
    udp = P.build_udp(V6_A, V6_B, 7, 9, b"zz" * 20)[40:]
    first = v6_with_ext([(44, b"\0\0\x00\x01\0\0\0\x05")], udp[:24], P.PROTO_UDP)  # offset 0, M=1
    pkt = parse(first)
    assert pkt.is_fragment and (pkt.sport, pkt.dport) == (7, 9)  # UDP length beyond: allowed in a fragment
    later = v6_with_ext([(44, b"\0\0\x00\x18\0\0\0\x05")], udp[24:], P.PROTO_UDP)  # offset 3 (24 bytes)
    pkt = parse(later)
    assert pkt.is_fragment and pkt.proto == P.PROTO_UDP and (pkt.sport, pkt.dport) == (0, 0)
    assert pkt.payload_offset == pkt.l4_offset == 48


def test_ipv4_fragments() -> None:
    raw = bytearray(P.build_udp(V4_A, V4_B, 1, 2, b"x" * 40))
    struct.pack_into("!H", raw, 6, 0x2000)  # MF, offset 0
    pkt = parse(bytes(raw))
    assert pkt.is_fragment and pkt.sport == 1
    struct.pack_into("!H", raw, 6, 3)  # offset 24 bytes
    pkt = parse(bytes(raw))
    assert pkt.is_fragment and (pkt.sport, pkt.dport) == (0, 0) and pkt.payload_offset == 20


def test_icmp_echo_ident_is_sport() -> None:
    raw = P.build_icmp_echo(V4_A, V4_B, 0x1234, 7, b"ping", reply=False)
    pkt = parse(raw)
    assert (pkt.proto, pkt.icmp_type, pkt.icmp_code, pkt.sport, pkt.dport) == (P.PROTO_ICMP, 8, 0, 0x1234, 0)
    assert bytes(pkt.payload) == b"ping" and l4_ok(raw)
    raw6 = P.build_icmp_echo(V6_A, V6_B, 0x4321, 7, b"ping6", reply=True)
    pkt6 = parse(raw6)
    assert (pkt6.proto, pkt6.icmp_type, pkt6.sport) == (P.PROTO_ICMPV6, 129, 0x4321) and l4_ok(raw6)


def test_gro_super_packet_parses() -> None:
    raw = P.build_tcp(V4_A, V4_B, 1, 2, 3, 4, P.ACK, 5, payload=b"\xaa" * 64000, partial_csum=True)
    pkt = parse(raw)
    assert pkt.payload_len == 64000 and len(pkt.buf) == 64040


def _mutate(raw: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


TCP4 = P.build_tcp(V4_A, V4_B, 1, 2, 3, 4, P.ACK, 5, payload=b"abcd")
UDP4 = P.build_udp(V4_A, V4_B, 1, 2, b"abcd")
TCP6 = P.build_tcp(V6_A, V6_B, 1, 2, 3, 4, P.ACK, 5, payload=b"abcd")


@pytest.mark.parametrize(
    "raw,why",
    [
        (b"", "empty"),
        (b"\x45", "truncated v4"),
        (TCP4[:19], "v4 shorter than header"),
        (TCP6[:39], "v6 shorter than header"),
        (b"\x55" + TCP4[1:], "version 5"),
        (b"\x44" + TCP4[1:], "IHL 4"),
        (_mutate(TCP4, 2, "!H", 19), "total length < header"),
        (_mutate(TCP4, 2, "!H", len(TCP4) + 1), "total length > buffer"),
        (_mutate(TCP4, 2, "!H", 30), "TCP header truncated"),
        (_mutate(TCP4, 32, "!B", 0x40), "TCP data offset 4"),
        (_mutate(TCP4, 32, "!B", 0xF0), "TCP data offset beyond packet"),
        (_mutate(UDP4, 24, "!H", 7), "UDP length < 8"),
        (_mutate(UDP4, 24, "!H", 13), "UDP length > packet"),
        (_mutate(TCP6, 4, "!H", 1000), "v6 payload length > buffer"),
        (_mutate(TCP6, 4, "!H", 0), "v6 jumbo / no TCP header"),
        (P.build_icmp_echo(V4_A, V4_B, 1, 1, b"", False)[:27], "ICMP truncated"),
    ],
)
def test_malformed_raises_packet_error(raw: bytes, why: str) -> None:
    with pytest.raises(PacketError):
        parse(raw)


def test_packet_error_is_value_error() -> None:
    assert issubclass(PacketError, ValueError)


def test_unknown_protocol_has_no_ports() -> None:
    raw = P.build_ipv4_header(V4_A, V4_B, 47, 4) + b"gre!"
    pkt = parse(raw)
    assert (pkt.proto, pkt.sport, pkt.dport, pkt.payload_offset) == (47, 0, 0, 20)


# --- TCP options ------------------------------------------------------------------------------------------


def _with_options(opts: bytes) -> bytes:
    return P.build_tcp(V4_A, V4_B, 1, 2, 3, 4, P.SYN, 5, opts)


def test_tcp_options_sack_blocks_and_unknown() -> None:
    opts = P.encode_tcp_options(sack_blocks=((1, 2), (3, 4), (0xFFFFFFFF, 5)))
    opts += b"\x1e\x04\xab\xcd"  # unknown kind 30 (MPTCP-like), skipped
    o = parse(_with_options(opts)).tcp_options()
    assert o.sack_blocks == ((1, 2), (3, 4), (0xFFFFFFFF, 5)) and o.mss is None


def test_tcp_options_eol_stops() -> None:
    o = parse(_with_options(b"\x00\x02\x04\x05")).tcp_options()  # EOL then garbage: ignored
    assert o == P.TcpOptions()


def test_no_options() -> None:
    assert parse(TCP4).tcp_options() == P.TcpOptions()
    assert parse(UDP4).tcp_options() == P.TcpOptions()


@pytest.mark.parametrize(
    "opts",
    [
        b"\x02\x03\x05\x01",  # MSS length 3
        b"\x03\x04\x07\x01",  # wscale length 4
        b"\x04\x03\x00\x01",  # SACK-permitted length 3
        b"\x05\x06\0\0\0\0",  # SACK length 6
        b"\x08\x08" + bytes(6),  # timestamp length 8
        b"\x01\x01\x01\x1e",  # option without length byte
        b"\x1e\x01\x00\x00",  # length < 2
        b"\x1e\x08\x00\x00",  # beyond the options area
    ],
)
def test_malformed_tcp_options(opts: bytes) -> None:
    opts += b"\0" * (-len(opts) % 4)
    pkt = parse(_with_options(opts))
    with pytest.raises(PacketError):
        pkt.tcp_options()


def test_encode_tcp_options_limits() -> None:
    assert len(P.encode_tcp_options(1460, 7, True, (), (1, 2))) == 20
    with pytest.raises(ValueError):
        P.encode_tcp_options(1460, 7, True, ((1, 2), (3, 4), (5, 6), (7, 8)), (1, 2))
    with pytest.raises(ValueError):
        P.build_tcp(V4_A, V4_B, 1, 2, 3, 4, P.SYN, 5, b"\x01\x01\x01")


# --- builders: partial checksum ---------------------------------------------------------------------------


@pytest.mark.parametrize("src,dst", [(V4_A, V4_B), (V6_A, V6_B)])
def test_partial_checksum_completes_to_valid(src: bytes, dst: bytes) -> None:
    payload = bytes(range(256)) * 40 + b"odd"
    for raw, proto, csum_off in (
        (P.build_tcp(src, dst, 1, 2, 3, 4, P.ACK | P.PSH, 5, payload=payload, partial_csum=True), 6, 16),
        (P.build_udp(src, dst, 1, 2, payload, partial_csum=True), 17, 6),
    ):
        pkt = parse(raw)
        l4 = bytearray(pkt.buf[pkt.l4_offset :])
        stored = struct.unpack_from("!H", l4, csum_off)[0]
        assert stored == P.pseudo_header_sum(src, dst, proto, len(l4))
        # What the kernel does for NEEDS_CSUM: checksum from csum_start to the end, field included.
        struct.pack_into("!H", l4, csum_off, P.checksum(bytes(l4)))
        completed = bytes(pkt.buf[: pkt.l4_offset]) + bytes(l4)
        assert l4_ok(completed)


def test_vnet_header_roundtrip() -> None:
    v = P.VnetHeader.for_tcp(4, 20, 32, 1448)
    assert v == (P.VNET_HDR_F_NEEDS_CSUM, P.GSO_TCPV4, 52, 1448, 20, 16)
    packed = v.pack()
    assert len(packed) == P.VNET_HDR_LEN == 10
    assert packed == struct.pack("<BBHHHH", 1, 1, 52, 1448, 20, 16)
    assert P.VnetHeader.unpack(packed + b"rest") == v
    assert P.VnetHeader.for_udp(40, 1200).gso_type == P.GSO_UDP_L4
    assert P.VnetHeader.for_tcp(6, 40, 20, 1428).gso_type == P.GSO_TCPV6
    with pytest.raises(PacketError):
        P.VnetHeader.unpack(b"short")


# --- reject builders --------------------------------------------------------------------------------------


def test_rst_for_syn() -> None:
    syn = parse(P.build_tcp(V4_A, V4_B, 40000, 443, 1000, 0, P.SYN, 65535))
    rst = parse(P.build_tcp_rst(syn))
    assert (rst.src, rst.dst, rst.sport, rst.dport) == (V4_B, V4_A, 443, 40000)
    assert (rst.seq, rst.ack, rst.tcp_flags) == (0, 1001, P.RST | P.ACK)
    assert l4_ok(bytes(rst.buf))


def test_rst_for_data_without_ack_counts_payload_and_fin() -> None:
    seg = parse(P.build_tcp(V6_A, V6_B, 1, 2, 0xFFFFFFFF, 0, P.FIN | P.PSH, 5, payload=b"abc"))
    rst = parse(P.build_tcp_rst(seg))
    assert (rst.seq, rst.ack, rst.tcp_flags) == (0, 3, P.RST | P.ACK)  # wraps mod 2**32
    assert l4_ok(bytes(rst.buf))


def test_rst_for_ack_segment() -> None:
    seg = parse(P.build_tcp(V4_A, V4_B, 1, 2, 500, 777, P.ACK, 5, payload=b"x"))
    rst = parse(P.build_tcp_rst(seg))
    assert (rst.seq, rst.ack, rst.tcp_flags) == (777, 0, P.RST)


def test_no_rst_for_rst_or_non_tcp() -> None:
    with pytest.raises(ValueError):
        P.build_tcp_rst(parse(P.build_tcp(V4_A, V4_B, 1, 2, 3, 4, P.RST, 0)))
    with pytest.raises(ValueError):
        P.build_tcp_rst(parse(UDP4))


def test_icmp_unreachable_v4_quotes_within_576() -> None:
    orig = P.build_udp(V4_A, V4_B, 5000, 443, b"q" * 1400)
    err = P.build_icmp_unreachable(parse(orig))
    assert len(err) == 576
    e = parse(err)
    assert (e.src, e.dst, e.proto, e.icmp_type, e.icmp_code) == (V4_B, V4_A, P.PROTO_ICMP, 3, 3)
    assert bytes(e.payload) == orig[: 576 - 28]
    assert l4_ok(err) and P.is_icmp_error(e)
    small = P.build_icmp_unreachable(parse(UDP4), code=P.ICMP_ADMIN_PROHIBITED)
    assert parse(small).icmp_code == 13 and bytes(parse(small).payload) == UDP4


def test_icmp_unreachable_v6_quotes_within_1280() -> None:
    orig = P.build_udp(V6_A, V6_B, 5000, 443, b"q" * 1400)
    err = P.build_icmp_unreachable(parse(orig))
    assert len(err) == 1280
    e = parse(err)
    assert (e.src, e.dst, e.proto, e.icmp_type, e.icmp_code) == (V6_B, V6_A, P.PROTO_ICMPV6, 1, 4)
    assert bytes(e.payload) == orig[: 1280 - 48]
    assert l4_ok(err)
    admin = parse(P.build_icmp_unreachable(parse(orig), code=P.ICMPV6_ADMIN_PROHIBITED))
    assert admin.icmp_code == 1


def test_icmp_too_big() -> None:
    orig4 = parse(P.build_tcp(V4_A, V4_B, 1, 2, 3, 4, P.ACK, 5, payload=b"x" * 1460))
    e4 = P.build_icmp_too_big(orig4, 1400)
    p4 = parse(e4)
    assert (p4.icmp_type, p4.icmp_code) == (3, 4) and struct.unpack_from("!H", e4, 26)[0] == 1400
    assert l4_ok(e4)
    orig6 = parse(P.build_tcp(V6_A, V6_B, 1, 2, 3, 4, P.ACK, 5, payload=b"x" * 1440))
    e6 = P.build_icmp_too_big(orig6, 1280)
    p6 = parse(e6)
    assert (p6.icmp_type, p6.icmp_code) == (2, 0) and struct.unpack_from("!I", e6, 44)[0] == 1280
    assert l4_ok(e6) and len(e6) == 1280


def test_no_icmp_error_about_icmp_error_fragment_or_multicast() -> None:
    err = parse(P.build_icmp_unreachable(parse(UDP4)))
    with pytest.raises(ValueError):
        P.build_icmp_unreachable(err)
    with pytest.raises(ValueError):
        P.build_icmp_too_big(err, 1280)
    err6 = parse(P.build_icmp_unreachable(parse(P.build_udp(V6_A, V6_B, 1, 2, b""))))
    with pytest.raises(ValueError):
        P.build_icmp_unreachable(err6)
    # echo requests may be answered with an error
    assert P.build_icmp_unreachable(parse(P.build_icmp_echo(V4_A, V4_B, 1, 1, b"", False)))
    mcast = parse(P.build_udp(V4_A, bytes([224, 0, 0, 251]), 5353, 5353, b""))
    with pytest.raises(ValueError):
        P.build_icmp_unreachable(mcast)
    raw = bytearray(UDP4)
    struct.pack_into("!H", raw, 6, 3)
    raw[10:12] = b"\0\0"
    with pytest.raises(ValueError):
        P.build_icmp_unreachable(parse(bytes(raw)))


def test_builders_reject_bad_addresses_and_sizes() -> None:
    with pytest.raises(ValueError):
        P.build_udp(V4_A, V6_B, 1, 2, b"")
    with pytest.raises(ValueError):
        P.build_udp(V4_A, V4_B, 1, 2, b"x" * 65530)


def test_sequence_numbers_wrap() -> None:
    pkt = parse(P.build_tcp(V4_A, V4_B, 1, 2, 2**32 + 5, 2**33 + 7, P.ACK, 5))
    assert (pkt.seq, pkt.ack) == (5, 7)


def test_quoted_flow_key() -> None:
    for orig in (UDP4, TCP6, P.build_icmp_echo(V4_A, V4_B, 99, 1, b"x", False),
                 P.build_icmp_echo(V6_A, V6_B, 98, 1, b"x", False)):
        original = parse(orig)
        err = parse(P.build_icmp_unreachable(original))
        assert P.quoted_flow_key(err) == original.flow_key
        big = parse(P.build_icmp_too_big(original, 1280))
        assert P.quoted_flow_key(big) == original.flow_key
    assert P.quoted_flow_key(parse(UDP4)) is None
    # A quote cut inside the ports says nothing.
    short = P.build_icmp_echo(V4_B, V4_A, 0, 0, b"", False)[:20] + bytes([3, 3, 0, 0, 0, 0, 0, 0]) + UDP4[:22]
    short = P.build_ipv4_header(V4_B, V4_A, P.PROTO_ICMP, len(short) - 20) + short[20:]
    assert P.quoted_flow_key(parse(short)) is None


@pytest.mark.parametrize("frag_field,non_first", [(0x2000, False), (0x6000, False), (0x0001, True), (0x2005, True)])
def test_ipv4_tcp_fragments_leave_the_fast_path(frag_field: int, non_first: bool) -> None:
    raw = bytearray(P.build_tcp(V4_A, V4_B, 1, 2, 3, 4, P.ACK, 5, payload=b"y" * 32))
    struct.pack_into("!H", raw, 6, frag_field)
    pkt = parse(bytes(raw))
    assert pkt.is_fragment
    assert (pkt.sport, pkt.payload_offset) == ((0, 20) if non_first else (1, 40))


def test_ipv6_tcp_fast_path_falls_back_for_bad_lengths() -> None:
    with pytest.raises(PacketError):
        parse(_mutate(TCP6, 52, "!B", 0x40))  # data offset 4
    with pytest.raises(PacketError):
        parse(_mutate(TCP6, 52, "!B", 0xF0))  # data offset beyond the packet
    pkt = parse(TCP6 + b"pad")
    assert len(pkt.buf) == len(TCP6) and bytes(pkt.payload) == b"abcd"


@pytest.mark.parametrize("size", [2049, 9000, 65535])
def test_checksum_without_numpy(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes((i * 13 + 1) & 0xFF for i in range(size))
    with_numpy = P.checksum(data)
    monkeypatch.setattr(P, "_np", None)
    assert P.checksum(data) == with_numpy == naive_checksum(data)
    raw = P.build_udp(V4_A, V4_B, 1, 2, data[: size - 100])
    assert l4_ok(raw)


def test_icmpv6_too_big_about_multicast_destination_is_allowed() -> None:
    mcast = parse(P.build_udp(V6_A, bytes.fromhex("ff020000000000000000000000000001"), 1, 2, b"x" * 1400))
    with pytest.raises(ValueError):
        P.build_icmp_unreachable(mcast)
    assert parse(P.build_icmp_too_big(mcast, 1280)).icmp_type == P.ICMPV6_PACKET_TOO_BIG
