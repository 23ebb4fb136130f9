"""engine.reassembly: fragments in, whole datagrams out, with an explicit clock.

Each test is a playbook: ``(now, fragment)`` steps fed in order to one :class:`Reassembler`, then what came
out and the counters. Fragments are built here by hand (the header fields spelled out) or by scapy (an
independent implementation), never by engine.fragment, so a shared misreading cannot cancel out.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Sequence

import pytest
from scapy.all import raw
from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, fragment6
from scapy.packet import Raw

from engine.packet import PROTO_UDP, build_udp, checksum, parse
from engine.reassembly import Reassembler
from engine.testing import addr

CLIENT, SERVER = addr("10.0.0.2"), addr("198.51.100.10")
CLIENT6, SERVER6 = addr("fd00:db8::2"), addr("2001:db8:100::10")

Step = tuple[float, bytes]


def play(steps: Sequence[Step], **limits: float) -> tuple[list[tuple[float, bytes]], Counter[str], Reassembler]:
    """Feed the steps; returns ``[(now, datagram)]`` for each datagram completed, the counters, the reassembler."""
    counters: Counter[str] = Counter()
    reassembler = Reassembler(counters, **limits)  # type: ignore[arg-type]
    out = []
    for now, data in steps:
        whole = reassembler.add(parse(data), now)
        if whole is not None:
            out.append((now, whole))
    return out, counters, reassembler


# -- building fragments by hand --------------------------------------------------------------------------


def datagram_v4(payload: bytes, ident: int = 0x1234) -> bytes:
    """A UDP datagram as the client's kernel builds one it will fragment: the ID set, DF clear."""
    packet = bytearray(build_udp(CLIENT, SERVER, 5000, 7, payload))
    packet[4:8] = struct.pack("!HH", ident, 0)
    packet[10:12] = b"\0\0"
    packet[10:12] = struct.pack("!H", checksum(packet[:20]))
    return bytes(packet)


def v4_fragment(whole: bytes, start: int, end: int, more: bool) -> bytes:
    """Bytes ``start:end`` of ``whole``'s IP payload as one IPv4 fragment (RFC 791 3.2)."""
    header = bytearray(whole[:20])
    data = whole[20:][start:end]
    header[2:4] = struct.pack("!H", 20 + len(data))
    header[6:8] = struct.pack("!H", (0x2000 if more else 0) | start >> 3)
    header[10:12] = b"\0\0"
    header[10:12] = struct.pack("!H", checksum(header))
    return bytes(header) + data


def v4_cut(whole: bytes, step: int = 1480) -> list[bytes]:
    size = len(whole) - 20
    return [v4_fragment(whole, start, min(start + step, size), start + step < size) for start in range(0, size, step)]


def v6_fragment(whole: bytes, start: int, end: int, more: bool, ident: int = 0xCAFE0001) -> bytes:
    """Bytes ``start:end`` of ``whole``'s payload (no extension headers) behind a fragment header."""
    data = whole[40:][start:end]
    header = bytearray(whole[:40])
    header[4:6] = struct.pack("!H", 8 + len(data))
    next_header = header[6]
    header[6] = 44
    return bytes(header) + struct.pack("!BxHI", next_header, start | int(more), ident) + data


def v6_cut(whole: bytes, step: int = 1448, ident: int = 0xCAFE0001) -> list[bytes]:
    size = len(whole) - 40
    return [v6_fragment(whole, start, min(start + step, size), start + step < size, ident)
            for start in range(0, size, step)]


PAYLOAD = bytes(range(256)) * 31 + b"tail"  # 7940 bytes: six fragments at MTU 1500
WHOLE_V4 = datagram_v4(PAYLOAD)
WHOLE_V6 = build_udp(CLIENT6, SERVER6, 5000, 7, PAYLOAD)


# -- the normal cases ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("whole", "cut"), [(WHOLE_V4, v4_cut), (WHOLE_V6, v6_cut)], ids=["ipv4", "ipv6"])
def test_in_order_fragments_give_back_the_datagram_byte_for_byte(whole: bytes, cut: type) -> None:
    fragments = cut(whole)
    assert len(fragments) == 6
    out, counters, reassembler = play([(0.001 * i, f) for i, f in enumerate(fragments)])
    assert out == [(0.005, whole)]
    assert counters == {"reassembly.fragments": 6, "reassembly.reassembled": 1}
    assert len(reassembler) == 0 and reassembler.held == 0
    packet = parse(out[0][1])
    assert not packet.is_fragment and (packet.sport, packet.dport) == (5000, 7) and bytes(packet.payload) == PAYLOAD


@pytest.mark.parametrize(("whole", "cut"), [(WHOLE_V4, v4_cut), (WHOLE_V6, v6_cut)], ids=["ipv4", "ipv6"])
def test_out_of_order_fragments_complete_on_the_last_hole(whole: bytes, cut: type) -> None:
    for seed in range(5):
        fragments = cut(whole)
        random.Random(seed).shuffle(fragments)
        out, counters, _ = play([(0.0, f) for f in fragments])
        assert [datagram for _, datagram in out] == [whole]
        assert counters["reassembly.reassembled"] == 1
    last_first = list(reversed(cut(whole)))
    assert play([(0.0, f) for f in last_first])[0] == [(0.0, whole)]


def test_exact_duplicates_are_ignored_and_the_datagram_still_completes() -> None:
    a, b, c, d, e, f = v4_cut(WHOLE_V4)
    out, counters, _ = play([(0.0, a), (0.0, a), (0.0, b), (0.0, f), (0.0, f), (0.0, c), (0.0, d), (0.0, b), (0.0, e)])
    assert out == [(0.0, WHOLE_V4)]
    assert counters["reassembly.duplicates"] == 3 and counters["reassembly.overlapping"] == 0


def test_two_datagrams_interleaved_are_kept_apart_by_their_identification() -> None:
    other = datagram_v4(b"z" * 3000, ident=0x4321)
    steps = [(0.0, f) for pair in zip(v4_cut(WHOLE_V4), v4_cut(other) + [b""] * 3) for f in pair if f]
    out, _, _ = play(steps)
    assert sorted(datagram for _, datagram in out) == sorted([WHOLE_V4, other])


def test_ipv6_unfragmentable_extension_headers_are_kept_and_point_at_the_upper_layer() -> None:
    """RFC 8200 4.5: the datagram keeps the offset-0 fragment's unfragmentable part; the Next Header of
    its last header takes the fragment header's value."""
    original = IPv6(src="fd00:db8::2", dst="2001:db8:100::10") / IPv6ExtHdrHopByHop() / UDP(sport=5000, dport=7) / Raw(PAYLOAD)
    with_frag = IPv6(src="fd00:db8::2", dst="2001:db8:100::10") / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(id=7) / UDP(
        sport=5000, dport=7) / Raw(PAYLOAD)
    fragments = [raw(f) for f in fragment6(with_frag, 1500)]
    out, counters, _ = play([(0.0, f) for f in fragments])
    assert [datagram for _, datagram in out] == [raw(original)]
    packet = parse(out[0][1])
    assert packet.proto == PROTO_UDP and packet.l4_offset == 48 and bytes(packet.payload) == PAYLOAD


def test_fragments_scapy_made_reassemble_to_what_scapy_fragmented() -> None:
    original = IP(src="10.0.0.2", dst="198.51.100.10", id=777, flags=0) / UDP(sport=5000, dport=7) / Raw(PAYLOAD)
    out, _, _ = play([(0.0, raw(f)) for f in reversed(fragment(original, 1480))])
    assert [datagram for _, datagram in out] == [raw(original)]
    original6 = IPv6(src="fd00:db8::2", dst="2001:db8:100::10") / IPv6ExtHdrFragment(id=99) / UDP(sport=1, dport=2) / Raw(PAYLOAD)
    out, _, _ = play([(0.0, raw(f)) for f in fragment6(original6, 1280)])
    assert [datagram for _, datagram in out] == [
        raw(IPv6(src="fd00:db8::2", dst="2001:db8:100::10") / UDP(sport=1, dport=2) / Raw(PAYLOAD))
    ]


# -- refused: overlaps (RFC 5722), contradictions, limits -------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
def test_an_overlap_discards_the_whole_datagram_and_its_later_fragments(version: int) -> None:
    whole = WHOLE_V4 if version == 4 else WHOLE_V6
    make = v4_fragment if version == 4 else v6_fragment
    step = 1480 if version == 4 else 1448
    first, second = make(whole, 0, step, True), make(whole, step, 2 * step, True)
    overlapping = make(whole, step - 8, 2 * step, True)  # starts 8 bytes inside the first
    rest = (v4_cut if version == 4 else v6_cut)(whole)[2:]
    out, counters, reassembler = play([(0.0, first), (0.1, overlapping), (0.2, second), *[(0.3, f) for f in rest]])
    assert out == []  # every byte arrived, but the datagram was refused at the overlap
    assert counters["reassembly.overlapping"] == 1
    assert counters["reassembly.discarded_fragments"] == 1 + len(rest)
    assert reassembler.held == 0
    # The refusal lasts until the timeout; then the same identification may start afresh.
    again = (v4_cut if version == 4 else v6_cut)(whole)
    out, counters, _ = play([(0.0, first), (0.0, overlapping), *[(3.5, f) for f in again]], timeout=3.0)
    assert out == [(3.5, whole)] and counters["reassembly.timed_out"] == 0


def test_same_offset_with_other_bytes_is_an_overlap_not_a_duplicate() -> None:
    first = v4_fragment(WHOLE_V4, 0, 1480, True)
    tampered = bytearray(first)
    tampered[-1] ^= 0xFF
    out, counters, _ = play([(0.0, first), (0.0, bytes(tampered)), *[(0.0, f) for f in v4_cut(WHOLE_V4)[1:]]])
    assert out == [] and counters["reassembly.overlapping"] == 1 and counters["reassembly.duplicates"] == 0


def test_a_fragment_covering_a_later_one_is_an_overlap() -> None:
    later = v4_fragment(WHOLE_V4, 2960, 4440, True)
    covering = v4_fragment(WHOLE_V4, 1480, 4440, True)
    out, counters, _ = play([(0.0, later), (0.0, covering)])
    assert out == [] and counters["reassembly.overlapping"] == 1


def test_contradicting_ends_discard_the_datagram() -> None:
    size = len(WHOLE_V4) - 20
    last = v4_fragment(WHOLE_V4, 5920, size, False)
    earlier_last = v4_fragment(WHOLE_V4, 4440, 5920, False)  # a second "last" fragment ending elsewhere
    _, counters, _ = play([(0.0, last), (0.0, earlier_last)])
    assert counters["reassembly.invalid"] == 1
    beyond = v4_fragment(WHOLE_V4, 5920, size, True)  # claims more data after the known end
    _, counters, _ = play([(0.0, v4_fragment(WHOLE_V4, 4440, 5920, False)), (0.0, beyond)])
    assert counters["reassembly.invalid"] == 1


def test_fragments_no_valid_datagram_can_have_are_dropped_alone() -> None:
    odd = v4_fragment(WHOLE_V4, 0, 1001, True)  # a non-last fragment must carry a multiple of 8 bytes
    empty = v4_fragment(WHOLE_V4, 1480, 1480, True)
    too_far = bytearray(v4_fragment(WHOLE_V4, 0, 16, False))  # would end past 65,535 bytes
    too_far[6:8] = struct.pack("!H", 65528 >> 3)
    too_far[10:12] = b"\0\0"
    too_far[10:12] = struct.pack("!H", checksum(too_far[:20]))
    too_far_v6 = v6_fragment(WHOLE_V6, 0, 16, False)
    too_far_v6 = too_far_v6[:42] + struct.pack("!H", 65528) + too_far_v6[44:]
    out, counters, reassembler = play([(0.0, odd), (0.0, empty), (0.0, bytes(too_far)), (0.0, too_far_v6)])
    assert out == [] and counters["reassembly.invalid"] == 4 and len(reassembler) == 0


def test_an_incomplete_datagram_times_out() -> None:
    fragments = v6_cut(WHOLE_V6)
    steps = [(0.0, f) for f in fragments[:-1]] + [(3.01, fragments[-1])]
    out, counters, reassembler = play(steps, timeout=3.0)
    assert out == [] and counters["reassembly.timed_out"] == 1
    assert len(reassembler) == 1  # the late last fragment started a new datagram, which waits in turn
    assert reassembler.expire(6.0) == 0 and reassembler.expire(6.02) == 1 and reassembler.held == 0
    # Within the timeout, the same sequence completes.
    assert play([(0.0, f) for f in fragments[:-1]] + [(2.99, fragments[-1])], timeout=3.0)[0] == [(2.99, WHOLE_V6)]


def test_the_byte_cap_evicts_the_oldest_datagrams() -> None:
    a = v4_cut(datagram_v4(b"a" * 2960, ident=1))
    b = v4_cut(datagram_v4(b"b" * 2960, ident=2))
    out, counters, reassembler = play([(0.0, a[0]), (0.1, b[0]), (0.2, b[1]), (0.3, a[1]), (0.4, a[2])], max_bytes=4000)
    # a[0] + b[0] fit; b[1] pushed the total over 4000: a was evicted; a's later fragments start anew.
    assert [datagram for _, datagram in out] == []
    assert counters["reassembly.evicted"] >= 1
    assert reassembler.held <= 4000
    # One datagram alone larger than the cap is refused rather than letting the cap be exceeded.
    out, counters, reassembler = play([(0.0, f) for f in v4_cut(WHOLE_V4)], max_bytes=4000)
    assert out == [] and counters["reassembly.evicted"] >= 1 and reassembler.held <= 4000


def test_the_datagram_cap_evicts_the_oldest_in_progress() -> None:
    firsts = [v4_cut(datagram_v4(b"x" * 2000, ident=i))[0] for i in range(5)]
    _, counters, reassembler = play([(0.0, f) for f in firsts], max_datagrams=3)
    assert len(reassembler) == 3 and counters["reassembly.evicted"] == 2
    # The survivors are the newest: ident 4's second fragment completes it.
    out, _, _ = play([(0.0, f) for f in firsts] + [(0.0, v4_cut(datagram_v4(b"x" * 2000, ident=4))[1])],
                     max_datagrams=3)
    assert [datagram for _, datagram in out] == [datagram_v4(b"x" * 2000, ident=4)]


def test_zero_datagrams_means_off_and_configure_applies_new_limits() -> None:
    counters: Counter[str] = Counter()
    reassembler = Reassembler(counters, max_datagrams=0)
    assert not reassembler.enabled and reassembler.add(parse(v4_cut(WHOLE_V4)[0]), 0.0) is None
    reassembler.configure(3.0, 1 << 20, 10)
    for i in range(4):
        reassembler.add(parse(v4_cut(datagram_v4(b"x" * 2000, ident=i))[0]), 0.0)
    assert len(reassembler) == 4
    reassembler.configure(3.0, 1 << 20, 2)
    assert len(reassembler) == 2 and counters["reassembly.evicted"] == 2
