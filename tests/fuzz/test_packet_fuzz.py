"""Robustness of engine.packet.parse: whatever bytes arrive, it parses or raises PacketError — nothing else
(no IndexError, struct.error, TypeError...), because the loop's only guard is ``except PacketError``.

Inputs: random bytes, random bytes behind a plausible IPv4/IPv6 first byte, and valid packets that were
truncated, bit-flipped, byte-overwritten or had their length fields set to random values.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import packet as P
from engine.fragment import Fragmenter
from engine.packet import PacketError, parse

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

V4_A, V4_B = bytes([10, 0, 0, 2]), bytes([192, 0, 2, 1])
V6_A = bytes.fromhex("fd000db8000000000000000000000002")
V6_B = bytes.fromhex("20010db8000000000000000000000001")
SACK_SYN_OPTIONS = P.encode_tcp_options(1460, 7, True, (), (1, 2))


def _v6_with_extensions(inner: bytes) -> bytes:
    """An IPv6 UDP datagram behind hop-by-hop, routing and a first-fragment header."""
    upper = inner[40:]
    ext = bytes([43, 0, 1, 4, 0, 0, 0, 0]) + bytes([44, 0, 0, 0, 0, 0, 0, 0]) + bytes([17, 0, 0, 1, 0, 0, 0, 9])
    return P.build_ipv6_header(V6_A, V6_B, 0, len(ext) + len(upper)) + ext + upper


SEEDS = [
    P.build_tcp(V4_A, V4_B, 1, 443, 10, 0, P.SYN, 65535, SACK_SYN_OPTIONS),
    P.build_tcp(V6_A, V6_B, 1, 443, 10, 20, P.ACK, 65535, P.encode_tcp_options(sack_blocks=((1, 2), (3, 4))),
                b"data" * 10),
    P.build_udp(V4_A, V4_B, 5353, 53, b"\x12\x34\x01\x00" + bytes(8)),
    P.build_udp(V6_A, V6_B, 5353, 53, b"query"),
    P.build_icmp_echo(V4_A, V4_B, 7, 1, b"ping", reply=False),
    P.build_icmp_echo(V6_A, V6_B, 7, 1, b"ping", reply=False),
    _v6_with_extensions(P.build_udp(V6_A, V6_B, 1, 2, b"frag")),
    *Fragmenter(first_id=3).split(P.build_udp(V4_A, V4_B, 1, 2, bytes(150)), 100)[:2],
    *Fragmenter(first_id=3).split(P.build_udp(V6_A, V6_B, 1, 2, bytes(150)), 120)[:2],
]


def general_path(data: bytes | bytearray | memoryview) -> P.Packet:
    """parse() without its TCP fast paths: the reference the fast paths must agree with."""
    view = memoryview(bytes(data))
    if not len(view):
        raise PacketError("empty")
    return P._parse_general(view, view[0], len(view))


def same_fields(a: P.Packet, b: P.Packet) -> bool:
    return all(getattr(a, s) == getattr(b, s) for s in P.PACKET_FIELDS if s != "buf") and a.buf == b.buf


def exercise(data: bytes | bytearray | memoryview) -> None:
    """Parse, then touch everything a consumer may touch; only PacketError may escape."""
    try:
        pkt = parse(data)
    except PacketError:
        try:
            general_path(memoryview(data).tobytes())
        except PacketError:
            return
        raise AssertionError("the fast path refused what the general path accepts")
    assert same_fields(pkt, general_path(memoryview(data).tobytes()))
    assert pkt.version in (4, 6)
    assert 0 <= pkt.l4_offset <= pkt.payload_offset <= pkt.payload_end <= len(pkt.buf)
    assert len(pkt.src) == len(pkt.dst) == (4 if pkt.version == 4 else 16)
    bytes(pkt.payload)
    _ = pkt.flow_key, pkt.src_ip, pkt.dst_ip, repr(pkt), P.quoted_flow_key(pkt)
    try:
        pkt.tcp_options()
    except PacketError:
        pass
    if pkt.is_fragment:  # what reassembly reads of it: its fields, or PacketError
        try:
            fields = P.fragment_fields(pkt)
        except PacketError:
            pass
        else:
            assert 0 < fields.data_offset <= len(pkt.buf) and fields.header_len <= fields.data_offset
    mtu = 128  # small, so many packets here are cut; still room for a first fragment's whole L4 header
    try:  # the fragmenter cuts what parsed, or refuses with ValueError
        pieces = Fragmenter(first_id=1).split(pkt.buf, mtu)
    except ValueError:
        pass
    else:
        assert all(len(piece) <= mtu for piece in pieces) or pieces == [bytes(pkt.buf)]
        for piece in pieces:
            parse(piece)
    # Reject builders on whatever parsed: a packet or a documented ValueError, nothing else.
    for build in (P.build_tcp_rst, P.build_icmp_unreachable, lambda p: P.build_icmp_too_big(p, 1280)):
        try:
            out = build(pkt)
        except ValueError:
            continue
        parse(out)


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    exercise(data)


@SETTINGS
@given(st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x40, 0x6F]), st.binary(max_size=120))
def test_random_bytes_behind_plausible_version(first: int, rest: bytes) -> None:
    exercise(bytes([first]) + rest)
    exercise(memoryview(bytearray([first]) + rest))


@SETTINGS
@given(st.sampled_from(SEEDS), st.data())
def test_truncated_valid_packets(seed: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(seed)))
    exercise(seed[:cut])


@SETTINGS
@given(st.sampled_from(SEEDS), st.lists(st.integers(0, 8 * 200 - 1), min_size=1, max_size=8))
def test_bit_flipped_valid_packets(seed: bytes, bits: list[int]) -> None:
    mutated = bytearray(seed)
    for bit in bits:
        index = (bit // 8) % len(mutated)
        mutated[index] ^= 1 << (bit % 8)
    exercise(bytes(mutated))


@SETTINGS
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 199), st.integers(0, 255)), min_size=1,
                                        max_size=6))
def test_overwritten_bytes_in_headers(seed: bytes, writes: list[tuple[int, int]]) -> None:
    mutated = bytearray(seed)
    for index, value in writes:
        mutated[index % min(len(mutated), 80)] = value  # aim at the headers, where lengths live
    exercise(bytes(mutated))


def test_odd_buffer_types() -> None:
    seed = SEEDS[0]
    exercise(memoryview(seed).cast("B", (len(seed),)))
    words = memoryview(bytearray(seed[: len(seed) & ~1])).cast("H")
    exercise(words)
    assert parse(words).sport == 1  # a typed view is read as its bytes
    exercise(memoryview(seed + seed)[::2])  # strided
    exercise(memoryview(seed[:40]).cast("B", (4, 10)))  # two-dimensional
    for bad in (b"", bytearray(), memoryview(b"")):
        exercise(bad)
    try:
        parse("not bytes")  # type: ignore[arg-type]
    except PacketError:
        pass
