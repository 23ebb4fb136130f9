"""Robustness of engine.reassembly: whatever fragments arrive, in whatever order, the reassembler neither
raises nor exceeds its bounds, and a datagram cut at random places and delivered in random order (with
duplicates) comes back byte for byte."""

from __future__ import annotations

import struct
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.packet import PacketError, build_udp, checksum, parse
from engine.reassembly import Reassembler
from engine.testing import addr

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

V4_A, V4_B = addr("10.0.0.2"), addr("198.51.100.10")
V6_A, V6_B = addr("fd00:db8::2"), addr("2001:db8:100::10")


def v4_piece(whole: bytes, start: int, end: int, more: bool, ident: int) -> bytes:
    header = bytearray(whole[:20])
    data = whole[20:][start:end]
    header[2:4] = struct.pack("!H", 20 + len(data))
    header[4:8] = struct.pack("!HH", ident, (0x2000 if more else 0) | (start >> 3 & 0x1FFF))
    header[10:12] = b"\0\0"
    header[10:12] = struct.pack("!H", checksum(header))
    return bytes(header) + data


def v6_piece(whole: bytes, start: int, end: int, more: bool, ident: int) -> bytes:
    data = whole[40:][start:end]
    header = bytearray(whole[:40])
    header[4:6] = struct.pack("!H", 8 + len(data))
    next_header, header[6] = header[6], 44
    return bytes(header) + struct.pack("!BxHI", next_header, (start & 0xFFF8) | int(more), ident) + data


@st.composite
def cut_datagram(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A datagram, cut at random 8-byte boundaries, shuffled, some pieces repeated."""
    v6 = draw(st.booleans())
    size = draw(st.integers(16, 9000))
    payload = draw(st.binary(min_size=size, max_size=size))
    whole = build_udp(V6_A, V6_B, 5000, 7, payload) if v6 else build_udp(V4_A, V4_B, 5000, 7, payload)
    if not v6:  # the client's kernel sends a datagram it fragments with DF clear and an ID
        header = bytearray(whole[:20])
        header[4:8] = struct.pack("!HH", 99, 0)
        header[10:12] = b"\0\0"
        header[10:12] = struct.pack("!H", checksum(header))
        whole = bytes(header) + whole[20:]
    data_len = len(whole) - (40 if v6 else 20)
    cuts = sorted(set(draw(st.lists(st.integers(1, (data_len - 1) // 8), min_size=1, max_size=12))))
    bounds = [0] + [c * 8 for c in cuts] + [data_len]  # at least two pieces: one alone is no fragment
    piece = v6_piece if v6 else v4_piece
    pieces = [piece(whole, a, b, b < data_len, 99) for a, b in zip(bounds, bounds[1:])]
    pieces += draw(st.lists(st.sampled_from(pieces), max_size=3))  # exact duplicates
    return whole, draw(st.permutations(pieces))


@SETTINGS
@given(cut_datagram())
def test_any_cut_in_any_order_reassembles_byte_for_byte(case: tuple[bytes, list[bytes]]) -> None:
    whole, pieces = case
    counters: Counter[str] = Counter()
    reassembler = Reassembler(counters)
    out = [datagram for piece in pieces if (datagram := reassembler.add(parse(piece), 0.0)) is not None]
    # Duplicates arriving after completion start a datagram of their own (which times out, or completes
    # again when every piece came twice): whatever comes out is the datagram.
    assert out and all(datagram == whole for datagram in out)
    assert counters["reassembly.overlapping"] == 0
    reassembler.expire(10.0)
    assert reassembler.held == 0 and len(reassembler) == 0


@st.composite
def hostile_fragments(draw: st.DrawFn) -> list[bytes]:
    """Fragments of a few identifications with random offsets, lengths and flags: overlaps, holes, ends
    that disagree, sizes past 65,535."""
    out = []
    for _ in range(draw(st.integers(1, 25))):
        v6 = draw(st.booleans())
        length = draw(st.integers(0, 1500) | st.sampled_from([0, 8, 16, 24]))
        whole = build_udp(V6_A, V6_B, 1, 2, bytes(length)) if v6 else build_udp(V4_A, V4_B, 1, 2, bytes(length))
        data_len = len(whole) - (40 if v6 else 20)
        start = draw(st.integers(0, 8191) | st.integers(0, 6)) * 8  # mostly near each other: overlaps
        end = draw(st.integers(0, data_len) | st.integers(0, data_len // 8).map(lambda n: n * 8))
        piece = v6_piece if v6 else v4_piece
        out.append(piece(whole, 0, end, draw(st.booleans()), draw(st.integers(0, 1))))
        if start:  # move it: rewrite the offset field of the fragment just built
            raw = bytearray(out[-1])
            if v6:
                raw[42:44] = struct.pack("!H", (start & 0xFFF8) | (raw[43] & 1))
            else:
                raw[6:8] = struct.pack("!H", (raw[6] & 0x20) << 8 | (start >> 3 & 0x1FFF))
                raw[10:12] = b"\0\0"
                raw[10:12] = struct.pack("!H", checksum(raw[:20]))
            out[-1] = bytes(raw)
    return out


@SETTINGS
@given(hostile_fragments(), st.integers(0, 3), st.sampled_from([2000, 20000, 1 << 20]))
def test_hostile_fragments_never_raise_and_stay_within_bounds(
    fragments: list[bytes], max_datagrams: int, max_bytes: int
) -> None:
    counters: Counter[str] = Counter()
    reassembler = Reassembler(counters, timeout=1.0, max_bytes=max_bytes, max_datagrams=max_datagrams)
    for i, data in enumerate(fragments):
        try:
            packet = parse(data)
        except PacketError:
            continue
        if not packet.is_fragment:
            continue
        whole = reassembler.add(packet, i * 0.1)
        assert len(reassembler) <= max_datagrams and 0 <= reassembler.held <= max_bytes
        if whole is not None:
            total = len(whole) if whole[0] >> 4 == 4 else len(whole) - 40
            assert total <= 65535
            try:
                parse(whole)
            except PacketError:
                pass  # e.g. a UDP length the pieces do not honour: the pipeline counts it malformed
    reassembler.expire(1e9)
    assert len(reassembler) == 0 and reassembler.held == 0
